"""Containers across a restart of the server: kept within their expiry, resumed lazily with their files."""

import os
from pathlib import Path

from smolrun.files import FileStore
from smolrun.sandbox.manager import ContainerManager
from smolrun.store import Store


def test_a_container_survives_a_restart_with_its_files_and_says_its_state_is_lost(sandbox_config,  # type: ignore[no-untyped-def]
                                                                                  tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    files = FileStore(store, tmp_path / "files")
    first = ContainerManager(store, sandbox_config, files, warm=0)
    meta = first.create("kept")
    first.add_file(meta["id"], "notes.txt", b"kept across")
    host_file = tmp_path / "host-owned"
    host_file.write_text("root's")
    code = (f"import os\nx = 1\nopen('/mnt/data/made.txt', 'w').write('by code')\n"
            f"os.symlink({str(host_file)!r}, '/mnt/data/planted')")  # a link to a host path, for the restart
    made, _ = first.execute(meta["id"], code, None)
    assert made.error is None and made.state_lost is False
    workdir = first.live(meta["id"]).workdir
    tmpfs = first.live(meta["id"])._tmpfs  # as root, where mounting is allowed
    assert os.path.ismount(workdir) is tmpfs
    first.close()  # the server stops: the worker ends, the files stay, on disk: no tmpfs outlives the server
    assert os.path.ismount(workdir) is False and sorted(os.listdir(workdir.parent)) == ["data", "owner.lock", "store"]

    second = ContainerManager(store, sandbox_config, files, warm=0)
    assert second.get(meta["id"])["status"] == "active"
    paths = sorted(f["path"] for f in second.list_files(meta["id"], "asc"))
    assert paths == ["/mnt/data/made.txt", "/mnt/data/notes.txt"]
    owner = host_file.stat().st_uid
    after, _ = second.execute(meta["id"], "print(open('/mnt/data/notes.txt').read(), "
                                          "open('/mnt/data/made.txt').read())\n'x' in globals()", None)
    assert (after.state_lost, after.result, after.error) == (True, "False", None)
    assert after.logs.startswith("[smolrun was restarted since this container's last call")
    assert "kept across by code" in after.logs
    assert host_file.stat().st_uid == owner  # the new owner took the link, never what it points to
    again, _ = second.execute(meta["id"], "open('/mnt/data/new.txt', 'w').write('ok')", None)
    assert (again.state_lost, again.error) == (False, None)  # its own files are writable by its new uid
    assert os.path.ismount(workdir) is tmpfs and second.live(meta["id"])._tmpfs is tmpfs  # a fresh quota tmpfs
    second.close()


def test_containers_idle_past_their_expiry_during_the_restart_expire_and_are_cleaned(sandbox_config,  # type: ignore[no-untyped-def]
                                                                                       tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    files = FileStore(store, tmp_path / "files")
    first = ContainerManager(store, sandbox_config, files, warm=0)
    meta = first.create("old", expires_minutes=1)
    container = first.live(meta["id"])
    container._kill()  # the process died without closing its containers
    store.execute("UPDATE containers SET last_active_at = last_active_at - 120 WHERE id = ?", meta["id"])
    second = ContainerManager(store, sandbox_config, files, warm=0)
    assert second.get(meta["id"])["status"] == "expired"
    assert not container.workdir.parent.exists()
    first.close()
    second.close()
