"""The partial file of one archive (stages/partial.py)."""
import hashlib
import os

import pytest

from stages.common import StageError
from stages.partial import Limits, TooLarge, Transfer

LIMITS = Limits(timeout_s=1.0, retries=0, backoff_s=0.0, backoff_max_s=0.0, chunk_bytes=1024,
                deadline_s=60.0, max_bytes=100)


class Bar:
    def update(self, n):
        pass


def test_digests_cover_exactly_the_bytes_on_disk(tmp_path):
    path = tmp_path / "a.zip.part"
    path.write_bytes(b"x" * 70)
    transfer = Transfer(path, "a.zip", LIMITS)
    assert transfer.resume_offset() == 70
    assert transfer.digests.md5.hexdigest() == hashlib.md5(b"x" * 70).hexdigest()
    with transfer.open(append=True) as out:
        transfer.add(b"y" * 30, out, Bar())
        with pytest.raises(TooLarge):  # 101 bytes: past max_bytes, never written
            transfer.add(b"z", out, Bar())
    assert path.read_bytes() == b"x" * 70 + b"y" * 30 and transfer.digests.size == 100


def test_partial_file_is_never_written_through_a_symlink(tmp_path):
    (tmp_path / "elsewhere").write_bytes(b"precious")
    (tmp_path / "a.zip.part").symlink_to(tmp_path / "elsewhere")
    transfer = Transfer(tmp_path / "a.zip.part", "a.zip", LIMITS)
    with pytest.raises(OSError):
        transfer.open(append=False)
    assert (tmp_path / "elsewhere").read_bytes() == b"precious"


def test_deadline(tmp_path):
    transfer = Transfer(tmp_path / "a.zip.part", "a.zip",
                        Limits(**{**LIMITS.__dict__, "deadline_s": 1e-9}))
    with pytest.raises(StageError, match=r"a.zip: not complete after download.deadline_s"):
        transfer.check_deadline()
    assert not os.path.lexists(tmp_path / "a.zip.part")
