"""Checkpoints whose unpickling would run code are refused, and said so (issue 12, item 9).

Every payload here would create a marker file if it ran; the marker must never appear. The refusal
must say that the checkpoint needs arbitrary code and was refused: never "not a valid weights file",
never torch's advice to retry with ``weights_only=False``.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from vidlang.cli import main as cli_main
from vidlang.errors import UnsafeCheckpointError, VidlangUserError
from vidlang.models.clip.pretrained import load_pretrained, read_state_file


def _shell_payload(marker: Path) -> str:
    return f"touch {marker}"


class _Reduce:
    """Pickles as ``callable(*args)``: what every code-running checkpoint does on load."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _zip_with_data_pkl(path: Path, data_pkl: bytes) -> None:
    """A torch zip checkpoint (as ``torch.save`` writes it) whose ``data.pkl`` is replaced."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, data_pkl if name.endswith("/data.pkl") else zin.read(name))


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def _torchscript_with(path: Path, data_pkl: bytes) -> None:
    """A real TorchScript archive (code/, constants.pkl) whose data.pkl carries the payload."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_Holder()), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w") as zout:
        assert any(n.endswith("constants.pkl") for n in zin.namelist())
        assert any("/code/" in n for n in zin.namelist())
        for name in zin.namelist():
            zout.writestr(name, data_pkl if name.endswith("/data.pkl") else zin.read(name))


def _payloads(tmp: Path, marker: Path) -> dict[str, Path]:
    cmd = _shell_payload(marker)
    out: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        out[name] = tmp / name
        out[name].write_bytes(data)

    # 1. torch.save of a dict holding an object whose __reduce__ is os.system (zip checkpoint)
    out["reduce_os_system.ckpt"] = tmp / "reduce_os_system.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Reduce(os.system, cmd)}, out["reduce_os_system.ckpt"])
    # 2./3. a raw (non-zip) pickle, protocol 2 (GLOBAL) and 5 (STACK_GLOBAL, FRAME)
    put("raw_proto2.pt", pickle.dumps(_Reduce(os.system, cmd), protocol=2))
    put("raw_proto5.pt", pickle.dumps(_Reduce(os.system, cmd), protocol=5))
    # 4. a class that does not exist here (unpickling it would import attacker-chosen code)
    put("unknown_class.pt", b"\x80\x02cnosuchmodule_vidlang\nNoSuchClass\n)\x81.")
    # 5. protocol 0 INST opcode calling os.system
    put("inst_opcode.pt", f"(S'{cmd}'\nios\nsystem\n.".encode())
    # 6. builtins.exec of Python source
    src = f"open({str(marker)!r}, 'w').close()"
    put("builtins_exec.pt", pickle.dumps(_Reduce(exec, src), protocol=2))
    # 7. zip checkpoint whose data.pkl is a protocol-4 payload
    out["zip_proto4.ckpt"] = tmp / "zip_proto4.ckpt"
    _zip_with_data_pkl(out["zip_proto4.ckpt"], pickle.dumps(_Reduce(os.system, cmd), protocol=4))
    # 8. zip checkpoint whose data.pkl references an unknown class
    out["zip_unknown_class.ckpt"] = tmp / "zip_unknown_class.ckpt"
    _zip_with_data_pkl(out["zip_unknown_class.ckpt"], b"\x80\x02cnosuchmodule_vidlang\nNoSuchClass\n)\x81.")
    # 9. a TorchScript archive (with code) whose data.pkl runs os.system
    out["torchscript.pt"] = tmp / "torchscript.pt"
    _torchscript_with(out["torchscript.pt"], pickle.dumps(_Reduce(os.system, cmd), protocol=2))
    # 10. a TorchScript archive whose data.pkl uses a torch function that is not a tensor rebuild
    out["torchscript_torch_fn.pt"] = tmp / "torchscript_torch_fn.pt"
    _torchscript_with(out["torchscript_torch_fn.pt"], pickle.dumps(_Reduce(torch.save, {}, str(marker)), protocol=2))
    # 11. the legacy (pre-zip) torch format: several pickles, then raw storages
    out["legacy_format.pt"] = tmp / "legacy_format.pt"
    torch.save({"w": torch.ones(3), "x": _Reduce(os.system, cmd)}, out["legacy_format.pt"],
               _use_new_zipfile_serialization=False)  # fmt: skip
    # 12. a pickle named like a safetensors file
    put("disguised.safetensors", pickle.dumps(_Reduce(os.system, cmd), protocol=2))
    return out


@pytest.fixture()
def evil(tmp_path) -> tuple[dict[str, Path], Path]:
    marker = tmp_path / "PWNED"
    return _payloads(tmp_path, marker), marker


SAFETENSORS_ONLY = {"disguised.safetensors"}  # read as safetensors, never unpickled: "not a safetensors file"


def _check_message(msg: str, name: str) -> None:
    assert name in msg
    assert "\n" not in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
    assert "not a valid weights file" not in msg


def test_every_payload_is_refused_as_unsafe_and_never_runs(evil):
    paths, marker = evil
    for name, path in paths.items():
        if name in SAFETENSORS_ONLY:
            continue
        with pytest.raises(UnsafeCheckpointError) as err:
            read_state_file(path)
        msg = str(err.value)
        _check_message(msg, name)
        assert "arbitrary code" in msg and "refused" in msg, msg
        assert isinstance(err.value, VidlangUserError)
        with pytest.raises(UnsafeCheckpointError):
            load_pretrained(path)
    assert not marker.exists()


def test_disguised_safetensors_is_not_unpickled(evil):
    paths, marker = evil
    with pytest.raises(ValueError, match=r"disguised\.safetensors.*safetensors") as err:
        read_state_file(paths["disguised.safetensors"])
    assert "weights_only" not in str(err.value)
    assert not marker.exists()


def test_the_unsafe_global_is_named(evil):
    paths, _ = evil
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        read_state_file(paths["raw_proto5.pt"])
    with pytest.raises(UnsafeCheckpointError, match=r"nosuchmodule_vidlang\.NoSuchClass"):
        read_state_file(paths["zip_unknown_class.ckpt"])


def test_corrupt_files_are_not_called_unsafe(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buf)
    (tmp_path / "truncated.pt").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "plain_truncated.pt").write_bytes(pickle.dumps({"a": 1}, protocol=2)[:-3])
    for name in ("junk.pt", "truncated.pt", "plain_truncated.pt"):
        with pytest.raises(ValueError, match=name) as err:
            read_state_file(tmp_path / name)
        assert not isinstance(err.value, UnsafeCheckpointError), (name, err.value)
        assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_broken_torchscript_archive_is_not_called_unsafe(tmp_path):
    _torchscript_with(tmp_path / "garbage_ts.pt", b"\x80\x02this is not a pickle")
    with pytest.raises(ValueError, match=r"garbage_ts\.pt") as err:
        read_state_file(tmp_path / "garbage_ts.pt")
    assert not isinstance(err.value, UnsafeCheckpointError), err.value


def test_safe_checkpoints_still_load(tmp_path):
    torch.save({"epoch": 1, "state_dict": {"w": torch.arange(4.0)}}, tmp_path / "ok.ckpt")
    assert torch.equal(read_state_file(tmp_path / "ok.ckpt")["state_dict"]["w"], torch.arange(4.0))
    torch.save({"w": torch.arange(3.0)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_file(tmp_path / "legacy.pt")["w"], torch.arange(3.0))


def test_a_pickle_of_something_else_is_a_clear_error(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt: not a CLIP checkpoint"):
        load_pretrained(tmp_path / "list.pt")


def test_convert_prints_one_line_and_exits_2(evil, tmp_path, capsys):
    paths, marker = evil
    for name in ("reduce_os_system.ckpt", "raw_proto5.pt", "torchscript.pt", "unknown_class.pt"):
        assert cli_main(["convert", str(paths[name]), "--out", str(tmp_path / "o")]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1, err
        _check_message(err, name)
        assert "arbitrary code" in err and "refused" in err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_convert_evil_ckpt_in_a_real_process(evil, tmp_path):
    """What a user sees in a shell: one line on stderr, exit status 2, no traceback, payload never run."""
    paths, marker = evil
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("VIDLANG_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "vidlang.cli", "convert", str(paths["reduce_os_system.ckpt"]), "--out",
         str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    _check_message(err, "reduce_os_system.ckpt")
    assert "arbitrary code" in err and "refused" in err
    assert not marker.exists()
