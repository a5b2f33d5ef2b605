"""Checkpoint payloads for the crash tests (no pytest import: crash subprocesses load this)."""

from pathlib import Path


def payload(step: int, prefix: str = "") -> dict[str, bytes]:
    """Files of a fake checkpoint of `step`: a large one and one in a subfolder."""
    return {
        f"{prefix}model.bin": f"weights of step {step};".encode() * 300,
        f"{prefix}opt/state.bin": b"%d" % step,
    }


def writer(step: int, tick=lambda: None, prefix: str = ""):
    """write_fn writing payload(step, prefix); `tick()` runs inside and after each file write."""

    def write(tmp: Path):
        files = []
        for rel, data in payload(step, prefix).items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                tick()  # a crash here leaves a torn file
                f.write(data[len(data) // 2 :])
            tick()
            files.append(rel)
        return files

    return write


def assert_is_step(ckpt: Path, step: int, prefixes=("",)) -> None:
    """`ckpt` is the committed checkpoint of `step`, holding exactly its payload."""
    from megarlhf.checkpoint.atomic import read_manifest

    assert ckpt.name == f"step_{step:06d}"
    for prefix in prefixes:
        for rel, data in payload(step, prefix).items():
            assert (ckpt / rel).read_bytes() == data
    assert read_manifest(ckpt)["step"] == step
