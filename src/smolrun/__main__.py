from smolrun.cli import main

main()
