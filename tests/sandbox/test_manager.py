from pathlib import Path

from smolrun.files import FileStore
from smolrun.sandbox.manager import ContainerManager
from smolrun.store import Store


def test_containers_left_by_a_previous_process_are_expired_and_cleaned(sandbox_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = Store(tmp_path / "db.sqlite")
    files = FileStore(store, tmp_path / "files")
    first = ContainerManager(store, sandbox_config, files, warm=0)
    meta = first.create("old")
    container = first.live(meta["id"])
    container._kill()  # the process died without closing its containers
    assert container.workdir.exists()
    second = ContainerManager(store, sandbox_config, files, warm=0)
    assert second.get(meta["id"])["status"] == "expired"
    assert not container.workdir.exists()
    first.close()
    second.close()
