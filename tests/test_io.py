"""mftcore/io.py: what atomic_dir leaves on disk follows the umask, whoever wrote the files."""

import os
import stat

import pytest

from mftcore.io import atomic_dir, current_umask


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_dir_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        target = tmp_path / "out"
        with atomic_dir(str(target)) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            for name, mode in (("private", 0o600), (os.path.join("sub", "deep"), 0o600), ("tool", 0o700)):
                os.close(os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT, mode))  # as safetensors does
        modes = {name: stat.S_IMODE(os.stat(target / name).st_mode) for name in ("private", "sub/deep", "tool")}
        assert modes == {"private": 0o666 & ~umask, "sub/deep": 0o666 & ~umask, "tool": 0o777 & ~umask}
    finally:
        os.umask(old)
