"""Reading a file that should hold the authors' state dict: torch.load with weights_only=True (no code
runs), unwrapped to a flat {key: tensor} dict; a file torch refuses is described in one sentence that
says what it holds (a pickled callable is named, read opcode by opcode without importing it).

    state = load_reference_state("paraformer_cifar10.pt")
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from layerpar.lifecycle.common import LifecycleError

WRAPPERS = ("state_dict", "model_state_dict", "model", "net")  # {"net": sd, "acc": ..} and friends
PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel / DDP, torch.compile


def load_reference_state(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (no code runs), unwrapped to a flat {key: tensor} dict."""
    path = Path(path)
    if path.is_dir():
        raise LifecycleError(f"state dict {str(path)!r} is a directory; pass the .pt file itself")
    if not path.is_file():
        raise LifecycleError(f"state dict {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise LifecycleError(f"state dict {str(path)!r} is empty (0 bytes); pass a file written by "
                             "torch.save(model.state_dict(), path)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise for a person
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors of every kind: the file is not a plain state dict
        raise _load_error(path, exc) from None
    for _ in range(2):  # {"net": state_dict, "epoch": ..} as written by common training scripts
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = [obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)]
            if inner:
                obj = inner[0]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LifecycleError(f"{path} does not hold a state dict of tensors")
    for prefix in PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def _load_error(path: Path, exc: Exception) -> LifecycleError:
    """One sentence for a file torch.load refused. torch's own text is not repeated: it advises
    weights_only=False, which runs any code the file holds and is wrong advice for a file from outside."""
    text = str(exc)
    blocked = re.search(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked", text)
    if blocked or _is_pickle(path):
        name = blocked.group(1) if blocked else next(iter(_pickled_globals(path)), None)
        if name:
            return LifecycleError(
                f"{path} refused: the file holds a pickled callable {_readable(name)}, which weights-only "
                "loading blocks (unpickling it would run that code); it is not a state dict of tensors "
                "-- do not load it with weights_only=False unless you wrote it yourself")
    if m := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return LifecycleError(
            f"{path} holds pickled Python objects ({m.group(1)}), not only tensors, so torch.load "
            "with weights_only=True refuses it; save model.state_dict() instead of the model object")
    if isinstance(exc, OSError):
        return LifecycleError(f"{path} cannot be read: {exc.strerror or exc}")
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = m.group(1) if m else (lines[0].split(". ")[0] if lines else "")
    reason = "" if "weights_only" in reason else f": {reason[:200]}"
    return LifecycleError(f"{path} is not a readable torch.save file (corrupt, truncated or another "
                          f"format; {type(exc).__name__}{reason})")


def _readable(name: str) -> str:
    """posix.system -> os.system (pickle records the module a function was defined in)."""
    module, _, attr = name.rpartition(".")
    return f"os.{attr}" if module in ("posix", "nt") else name


def _is_pickle(path: Path) -> bool:
    """A bare pickle (not torch's zip container): starts with the PROTO opcode or is a protocol-0/1 one."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")


def _pickled_globals(path: Path) -> list[str]:
    """The module.name of every GLOBAL / STACK_GLOBAL in the file's pickle (torch's data.pkl inside
    the zip, or a bare pickle), read opcode by opcode: nothing is imported or run."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a file too broken to scan: the caller's generic sentence
        return []
    safe = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")
    return [n for n in names if not n.startswith(safe)]
