"""The wide bad-input table (issue 13): every row is a bad input that must fail cleanly.

Each row runs one ``dsrewrite`` command in-process (click's CliRunner) on files made for it and
asserts: exit 2, exactly one ``error:`` line holding the expected fragment, no traceback, the
input folder's listing and every input file's bytes unchanged, nothing written to the output
folder and no marker file from any payload. A row still running after TIME_LIMIT_S fails (a hang
guard, not a timing claim: hangs and resource bombs are bad input too). Rows are data: ``R(id, argv, fragment, files=...)``.

Placeholders in argv: ``{d}`` the input folder, ``{o}`` the (empty) output folder, ``{m}`` the
marker a payload would create, ``{F}`` this module (its factories are arch specs). ``apply``,
``plan`` and ``inspect`` get ``--input-shape 1,3,16,16`` unless the row gives a shape, and
``apply`` gets ``-o {o}/light.pt`` unless it names an output.

Cases the older tables already hold (tests/test_bad_input.py, test_cli_errors.py, test_arch.py)
are not repeated here; docs/robustness.md says which file holds what.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import signal
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from cli_checks import assert_clean_cli_error, run_cli

F = __name__
SHAPE_ARG = "1,3,16,16"
TIME_LIMIT_S = 60  # per row, a hang guard: a bomb or a hang fails the row instead of stalling the suite


# ----------------------------------------------------------------------------- factories (arch specs)


def small_net(seed: int = 0) -> nn.Sequential:
    """Stem 3→16 and two 16→16 3×3 convs ('2' and '4' are what all_3x3 replaces)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1)).eval()


def nan_net() -> nn.Sequential:
    net = small_net()
    with torch.no_grad():
        net[2].weight[0, 0, 1, 1] = float("nan")
    return net


def inf_net() -> nn.Sequential:
    net = small_net()
    with torch.no_grad():
        net[4].weight[3, 2, 0, 0] = float("inf")
    return net


def returns_none() -> None:
    return None


def returns_class() -> type:
    return nn.Conv2d


def raises_generator_exit() -> nn.Module:
    raise GeneratorExit("stop")


def raises_memory_error() -> nn.Module:
    raise MemoryError()


def raises_recursion() -> nn.Module:
    return raises_recursion()


MODULE_INSTANCE = small_net()  # an instance, not a class or a function


class Payload:
    """A pickle that would create the marker file if it ever ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# ----------------------------------------------------------------------------- input files

NESTED = 50_000
ALIAS_BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(9)]) + \
    "\nname: bomb\n"

#: recipe files: name -> text (or bytes)
TEXTS: dict[str, Any] = {
    "bomb.yaml": ALIAS_BOMB,
    "selfref.yaml": "name: x\nselect: &s\n  include: *s\n",
    "selfref_list.yaml": "name: x\nselect:\n  include: &l [*l]\n",
    "deep_list.yaml": "name: x\nselect: " + "[" * NESTED + "]" * NESTED + "\n",
    "deep_map.yaml": "name: x\nselect: " + "{a: " * NESTED + "1" + "}" * NESTED + "\n",
    "deep_block.yaml": "name: x\n" + "".join(" " * i + f"k{i}:\n" for i in range(500)),
    "huge.yaml": "name: x\n" + "# padding\n" * 300_000,
    "latin1.yaml": "name: caf\xe9\n".encode("latin-1"),
    "binary.yaml": b"\x00\x01\x02\xff\xfe" * 10,
    "list.yaml": "- name: x\n- name: y\n",
    "scalar.yaml": "just a string\n",
    "nested_q.yaml": "name: x\nselect:\n  include: 're:(.*.*.*)*X'\n",
    "nested_plus.yaml": "name: x\nselect:\n  include: 're:(a+)+$'\n",
    "alt_star.yaml": "name: x\nselect:\n  include: 're:(a|a)*X'\n",
    "word_space.yaml": "name: x\nselect:\n  exclude: ['re:(\\w+\\s?)*$']\n",
    "nested_override.yaml": "name: x\noverrides:\n  - match: 're:((\\d+)*\\.)*x'\n    skip: true\n",
    "long_regex.yaml": "name: x\nselect:\n  include: 're:" + "a" * 5000 + "'\n",
    "big_repeat.yaml": "name: x\nselect:\n  include: 're:a{1000000}'\n",
    "dm_float.yaml": "name: x\nreplace:\n  depth_multiplier: 1.0e+20\n",
    "dm_big.yaml": "name: x\nreplace:\n  depth_multiplier: 100000000000000000000\n",
    "dm_nan.yaml": "name: x\nreplace:\n  depth_multiplier: .nan\n",
    "dm_bool.yaml": "name: x\nreplace:\n  depth_multiplier: true\n",
    "dm_10.yaml": "name: x\nreplace:\n  depth_multiplier: 10\n",
    "dm_override.yaml": "name: x\noverrides:\n  - match: '4'\n    replace: {depth_multiplier: 50}\n",
    "energy_nan.yaml": "name: x\nreplace:\n  energy: .nan\n",
    "energy_inf.yaml": "name: x\nreplace:\n  energy: .inf\n",
    "speed_inf.yaml": "name: x\nlatency:\n  min_speedup: .inf\n",
    "speed_nan.yaml": "name: x\nlatency:\n  min_speedup: .nan\n",
    "speed_huge.yaml": "name: x\nlatency:\n  min_speedup: 1.0e+300\n",
    "rounds_huge.yaml": "name: x\nlatency:\n  rounds: 1000000000000000000000000000000\n",
    "rounds_float.yaml": "name: x\nlatency:\n  rounds: 1.0e+30\n",
    "rounds_zero.yaml": "name: x\nlatency:\n  rounds: 0\n",
    "warmup_huge.yaml": "name: x\nlatency:\n  warmup: 10000000000\n",
    "os_nan.yaml": "name: x\nselect:\n  output_stride: .nan\n",
    "os_inf.yaml": "name: x\nselect:\n  output_stride: .inf\n",
    "os_float.yaml": "name: x\nselect:\n  output_stride: 2.5\n",
    "os_min_nan.yaml": "name: x\nselect:\n  output_stride: {min: .nan}\n",
    "inch_neg.yaml": "name: x\nselect:\n  in_channels: -3\n",
    "inch_huge.yaml": "name: x\nselect:\n  in_channels: {max: 100000000000000000000000}\n",
    "inch_swap.yaml": "name: x\nselect:\n  out_channels: {min: 64, max: 8}\n",
    "ks_zero.yaml": "name: x\nselect:\n  kernel_size: 0\n",
    "ks_huge.yaml": "name: x\nselect:\n  kernel_size: 100000000000000000000\n",
    "ks_str.yaml": "name: x\nselect:\n  kernel_size: '3x0'\n",
    "stride_inf.yaml": "name: x\nselect:\n  stride: .inf\n",
    "dilation_neg.yaml": "name: x\nselect:\n  dilation: [-1, 1]\n",
    "order_typo.yaml": "name: x\nreplace:\n  order: dwpw\n",
    "init_typo.yaml": "name: x\nreplace:\n  init: svdd\n",
    "midact.yaml": "name: x\nreplace:\n  mid_act: gelu2\n",
    "dupkey.yaml": "name: x\nreplace:\n  order: dw_pw\n  order: pw_dw\n",
    "pyname.yaml": "name: !!python/name:os.system x\n",
    "pynew.yaml": "name: !!python/object/new:os.system [\"touch {m}\"]\n",
    "pytag_key.yaml": "? !!python/object/apply:os.system [\"touch {m}\"]\n: 1\n",
    "date.yaml": "name: 2024-01-02\n",
    "set.yaml": "name: x\nselect:\n  include: !!set {a, b}\n",
    "binary_tag.yaml": "name: !!binary aGVsbG8=\n",
    "empty_include.yaml": "name: x\nselect:\n  include: []\n",
    "bad_regex.yaml": "name: x\nselect:\n  include: 're:(abc'\n",
    "override_nomatch.yaml": "name: x\noverrides:\n  - skip: true\n",
    "tabs.yaml": "name: x\nselect:\n\tinclude: a\n",
    "unknown_top.yaml": "name: x\nselectt: {}\n",
    "empty.yaml": "",
    "null.yaml": "null\n",
    "notjson.json": "{not json",
    "hello.pt": "hello, I am not a torch file\n",
    "model.json": '{"model": "resnet"}',
    "keys.yaml": "name: x\nselect:\n" + "".join(f"  k{i}: 1\n" for i in range(60_000)),
}


def _save(obj: Any) -> Callable[[Path], None]:
    return lambda p: torch.save(obj() if callable(obj) else obj, p)


def _zip_not_torch(p: Path) -> None:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("foo.txt", "not a torch archive")


def _corrupt_middle(p: Path) -> None:
    """A torch zip whose pickle (data.pkl) has garbage in its middle (the archive itself stays readable)."""
    torch.save(small_net(), p)
    data = bytearray(p.read_bytes())
    start = data.index(b"data.pkl") + 64
    for i in range(start, start + 64):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


def _raw_pickle(p: Path) -> None:
    p.write_bytes(pickle.dumps(Payload(p.parent / "PWNED")))


def _torch_payload(p: Path) -> None:
    torch.save({"state_dict": small_net().state_dict(), "extra": Payload(p.parent / "PWNED")}, p)


def _npy(arr: Any) -> Callable[[Path], None]:
    return lambda p: np.save(p, arr() if callable(arr) else arr)


def _npz(p: Path) -> None:
    np.savez(p, a=np.zeros((2, 3, 16, 16), np.float32), b=np.zeros((2, 5, 16, 16), np.float32))


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _images(p: Path, bad: bool) -> None:
    p.mkdir()
    if bad:
        (p / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    else:
        (p / "notes.txt").write_text("no images here")


def _x(shape: tuple[int, ...], fill: float | None = None, dtype: torch.dtype = torch.float32) -> Callable[[], Any]:
    def make() -> torch.Tensor:
        t = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        if fill is not None:
            t.view(-1)[len(t.view(-1)) // 2] = fill
        return t
    return make


def _batches(*makers: Callable[[], Any]) -> Callable[[], list[Any]]:
    return lambda: [m() for m in makers]


def _rewrite_pair(p: Path, mutate: Callable[[dict[str, Any]], Any]) -> None:
    """``light.safetensors`` + ``light.plan.json`` (a real rewrite of small_net), the plan changed by ``mutate``."""
    base = _baseline()
    (p.parent / "light.safetensors").write_bytes(base["weights"])
    plan = json.loads(base["plan"])
    out = mutate(plan)
    text = out if isinstance(out, (str, bytes)) else json.dumps(plan if out is None else out)
    (p.parent / "light.plan.json").write_bytes(text if isinstance(text, bytes) else text.encode())


_BASE: dict[str, bytes] = {}


def _baseline() -> dict[str, bytes]:
    if not _BASE:
        import tempfile

        from dsrewrite.io import save_rewrite
        from dsrewrite.planner import plan

        model = small_net()
        p = plan(model, "all_3x3", torch.zeros(1, 3, 16, 16))
        from dsrewrite.apply import apply_plan

        d = Path(tempfile.mkdtemp())
        w, pf = save_rewrite(apply_plan(model, p), p, d / "light.safetensors", save_format="safetensors")
        _BASE.update(weights=w.read_bytes(), plan=pf.read_bytes())
    return _BASE


def _cfg(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(plan: dict[str, Any]) -> None:
        next(e for e in plan["entries"] if e["action"] == "replace")["config"][key] = value
    return mutate


def _set(**kv: Any) -> Callable[[dict[str, Any]], None]:
    return lambda plan: plan.update(kv)


def _entry(**kv: Any) -> Callable[[dict[str, Any]], None]:
    return lambda plan: next(e for e in plan["entries"] if e["action"] == "replace").update(kv)


def _lying_npy(p: Path) -> None:
    """A .npy whose header claims more samples than the file holds."""
    np.save(p, np.zeros((2, 3, 16, 16), np.float32))
    p.write_bytes(p.read_bytes().replace(b"(2, 3, 16, 16)", b"(9, 3, 16, 16)"))


def _unreadable(maker: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        maker(p)
        p.chmod(0)
    return make


def _plan_fifo(p: Path) -> None:
    _rewrite_pair(p, lambda plan: None)
    (p.parent / "light.plan.json").unlink()
    os.mkfifo(p.parent / "light.plan.json")


def _plan_dir(p: Path) -> None:
    _rewrite_pair(p, lambda plan: None)
    (p.parent / "light.plan.json").unlink()
    (p.parent / "light.plan.json").mkdir()


#: other input files: name -> maker(path)
MAKERS: dict[str, Callable[[Path], None]] = {
    "net.pt": _save(small_net),
    "nan_net.pt": _save(nan_net),
    "inf_net.pt": _save(inf_net),
    "nan_bias.pt": _save(lambda: _with_bias_nan(small_net())),
    "sd.pt": _save(lambda: small_net().state_dict()),
    "tensor.pt": _save(torch.zeros(3)),
    "list.pt": _save([torch.zeros(3), torch.ones(2)]),
    "zip.pt": _zip_not_torch,
    "corrupt.pt": _corrupt_middle,
    "raw_pickle.pt": _raw_pickle,
    "payload.pt": _torch_payload,
    "fifo.pt": _fifo,
    "fifo.yaml": _fifo,
    "fifo.npy": _fifo,
    "model.npy": _npy(np.zeros((3, 3), np.float32)),
    "dir.pt": lambda p: p.mkdir(),
    # calibration data
    "c_empty.pt": _save(_x((0, 3, 16, 16))),
    "c_nan.pt": _save(_x((4, 3, 16, 16), float("nan"))),
    "c_inf.pt": _save(_x((4, 3, 16, 16), float("inf"))),
    "c_ninf.pt": _save(_x((4, 3, 16, 16), float("-inf"))),
    "c_chan.pt": _save(_x((4, 5, 16, 16))),
    "c_gray.pt": _save(_x((4, 1, 16, 16))),
    "c_3d.pt": _save(_x((3, 16, 16))),
    "c_5d.pt": _save(_x((2, 3, 4, 16, 16))),
    "c_1d.pt": _save(_x((16,))),
    "c_scalar.pt": _save(torch.tensor(1.0)),
    "c_list_nan.pt": _save(_batches(_x((2, 3, 16, 16)), _x((2, 3, 16, 16)), _x((2, 3, 16, 16), float("nan")))),
    "c_list_chan.pt": _save(_batches(_x((2, 3, 16, 16)), _x((2, 4, 16, 16)))),
    "c_list_empty.pt": _save([]),
    "c_list_str.pt": _save(["a.png", "b.png"]),
    "c_dict.pt": _save({"x": _x((2, 3, 16, 16))()}),
    "c_complex.pt": _save(_x((2, 3, 16, 16), dtype=torch.complex64)),
    "c_bool.pt": _save(torch.ones(2, 3, 16, 16, dtype=torch.bool)),
    "c_payload.pt": lambda p: torch.save([Payload(p.parent / "PWNED")], p),
    "c_nan.npy": _npy(lambda: _x((2, 3, 16, 16), float("nan"))().numpy()),
    "c_chan.npy": _npy(np.zeros((2, 7, 16, 16), np.float32)),
    "c_obj.npy": lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
    "c_str.npy": _npy(np.array(["a", "b"])),
    "c_chan.npz": _npz,
    "c_text.pt": lambda p: p.write_text("not a tensor file"),
    "c_noimg": lambda p: _images(p, bad=False),
    "c_badimg": lambda p: _images(p, bad=True),
    "x_nan.pt": _save(_x((1, 3, 16, 16), float("nan"))),
    "x_empty.pt": _save(_x((0, 3, 16, 16))),
    "x_str.pt": _save("a string"),
    "x_chan.pt": _save(_x((1, 6, 16, 16))),
    # plan sidecars (light.safetensors + light.plan.json)
    "p_list": lambda p: _rewrite_pair(p, lambda plan: [plan]),
    "p_null": lambda p: _rewrite_pair(p, lambda plan: "null"),
    "p_string": lambda p: _rewrite_pair(p, lambda plan: '"a plan"'),
    "p_number": lambda p: _rewrite_pair(p, lambda plan: "3.5"),
    "p_deep": lambda p: _rewrite_pair(p, lambda plan: "[" * 100_000 + "]" * 100_000),
    "p_deep_entry": lambda p: _rewrite_pair(p, lambda plan: json.dumps(plan)[:-1] + ', "x": ' + "[" * 100_000
                                             + "]" * 100_000 + "}"),
    "p_latin1": lambda p: _rewrite_pair(p, lambda plan: json.dumps(plan).replace("all_3x3", "caf\xe9")
                                         .encode("latin-1")),
    "p_empty": lambda p: _rewrite_pair(p, lambda plan: b""),
    "p_badjson": lambda p: _rewrite_pair(p, lambda plan: "{entries: ["),
    "p_nan": lambda p: _rewrite_pair(p, lambda plan: json.dumps(plan).replace('"depth_multiplier": 1',
                                                                             '"depth_multiplier": NaN')),
    "p_version": lambda p: _rewrite_pair(p, _set(format_version=99)),
    "p_entries_dict": lambda p: _rewrite_pair(p, _set(entries={"a": 1})),
    "p_entries_none": lambda p: _rewrite_pair(p, _set(entries=None)),
    "p_entry_int": lambda p: _rewrite_pair(p, _set(entries=[1, 2])),
    "p_no_name": lambda p: _rewrite_pair(p, lambda plan: plan["entries"][0].pop("name") and None),
    "p_name_int": lambda p: _rewrite_pair(p, _entry(name=4)),
    "p_unknown_name": lambda p: _rewrite_pair(p, _entry(name="decoder.9")),
    "p_action": lambda p: _rewrite_pair(p, _entry(action="explode")),
    "p_cfg_list": lambda p: _rewrite_pair(p, _entry(config=[1, 2])),
    "p_cfg_extra": lambda p: _rewrite_pair(p, _cfg("rm_rf", True)),
    "p_dm_100k": lambda p: _rewrite_pair(p, _cfg("depth_multiplier", 100_000)),
    "p_dm_10": lambda p: _rewrite_pair(p, _cfg("depth_multiplier", 10)),
    "p_dm_zero": lambda p: _rewrite_pair(p, _cfg("depth_multiplier", 0)),
    "p_dm_neg": lambda p: _rewrite_pair(p, _cfg("depth_multiplier", -4)),
    "p_dm_str": lambda p: _rewrite_pair(p, _cfg("depth_multiplier", "9")),
    "p_dm_float": lambda p: _rewrite_pair(p, _cfg("depth_multiplier", 1.5)),
    "p_dm_1e20": lambda p: _rewrite_pair(p, _cfg("depth_multiplier", 1e20)),
    "p_dm_bool": lambda p: _rewrite_pair(p, _cfg("depth_multiplier", True)),
    "p_order": lambda p: _rewrite_pair(p, _cfg("order", "dwpw")),
    "p_init": lambda p: _rewrite_pair(p, _cfg("init", "eval")),
    "p_midnorm": lambda p: _rewrite_pair(p, _cfg("mid_norm", "layernorm9")),
    "p_midact": lambda p: _rewrite_pair(p, _cfg("mid_act", "os.system")),
    "p_arch_args": lambda p: _rewrite_pair(p, _set(arch_args=[1, 2])),
    "p_shape": lambda p: _rewrite_pair(p, _set(input_shape="big")),
    "c_lie.npy": _lying_npy,
    "x.fifo.pt": _fifo,
    "ro_net.pt": _unreadable(_save(small_net)),
    "ro_recipe.yaml": _unreadable(lambda p: p.write_text("name: x\n")),
    "ro_calib.pt": _unreadable(_save(_x((4, 3, 16, 16)))),
    "p_fifo": _plan_fifo,
    "p_dir": _plan_dir,
    "p_huge": lambda p: _rewrite_pair(p, lambda plan: json.dumps(plan)[:-1] + ', "pad": "' + "x" * (20 << 20)
                                       + '"}'),
}


def _with_bias_nan(net: nn.Sequential) -> nn.Sequential:
    with torch.no_grad():
        net[2].bias[5] = float("nan")
    return net


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    id: str
    argv: str
    fragment: str
    files: tuple[str, ...]
    cmd: str
    code: int


def R(id: str, argv: str, fragment: str, files: str = "net.pt", cmd: str = "apply", code: int = 2) -> Row:
    return Row(id, argv, fragment, tuple(files.split()), cmd, code)


NET = "{d}/net.pt --recipe all_3x3"
PAIR = "{d}/light.safetensors --arch {F}:small_net --recipe all_3x3"

ROWS: list[Row] = [
    # --- model files
    R("model missing", "{d}/nope.pt --recipe all_3x3", "nope.pt", ""),
    R("model is a folder", "{d}/dir.pt --recipe all_3x3", "dir.pt", "dir.pt"),
    R("model is a FIFO", "{d}/fifo.pt --recipe all_3x3", "not a regular file", "fifo.pt"),
    R("model is /dev/zero", "/dev/zero --recipe all_3x3", "not a regular file", ""),
    R("model name too long", "{d}/" + "m" * 300 + ".pt --recipe all_3x3", "too long", ""),
    R("model path with NUL", "{d}/a\0b.pt --recipe all_3x3", "null byte", ""),
    R("model is text", "{d}/hello.pt --recipe all_3x3", "hello.pt", "hello.pt"),
    R("model is JSON", "{d}/model.json --recipe all_3x3", "model.json", "model.json"),
    R("model is a zip, not torch", "{d}/zip.pt --recipe all_3x3", "zip.pt", "zip.pt"),
    R("model bytes corrupted", "{d}/corrupt.pt --recipe all_3x3", "corrupt.pt", "corrupt.pt"),
    R("model is a raw pickle payload", "{d}/raw_pickle.pt --recipe all_3x3", "raw_pickle.pt", "raw_pickle.pt"),
    R("checkpoint holds a payload", "{d}/payload.pt --arch {F}:small_net --recipe all_3x3", "payload.pt",
      "payload.pt"),
    R("model is a tensor", "{d}/tensor.pt --recipe all_3x3", "tensor.pt", "tensor.pt"),
    R("model is a list", "{d}/list.pt --recipe all_3x3", "list.pt", "list.pt"),
    R("model is a .npy", "{d}/model.npy --recipe all_3x3", "model.npy", "model.npy"),
    R("state dict, unknown --state-dict-key", "{d}/sd.pt --arch {F}:small_net --state-dict-key nope "
      "--recipe all_3x3", "nope", "sd.pt"),
    R("NaN weight in a selected conv", "{d}/nan_net.pt --recipe all_3x3", "'2'", "nan_net.pt"),
    R("inf weight in a selected conv", "{d}/inf_net.pt --recipe all_3x3", "'4'", "inf_net.pt"),
    R("NaN bias in a selected conv", "{d}/nan_bias.pt --recipe all_3x3", "'2'", "nan_bias.pt"),
    R("NaN weight, plan command", "{d}/nan_net.pt --recipe all_3x3", "nan", "nan_net.pt", cmd="plan"),
    R("NaN weight from a factory", "{F}:nan_net --recipe all_3x3", "nan", ""),
    R("inf weight from a factory, calibrated", "{F}:inf_net --recipe all_3x3 --calib {d}/c.pt", "inf",
      "c.pt"),
    R("inspect: model missing", "{d}/nope.pt", "nope.pt", "", cmd="inspect"),
    R("inspect: model is a FIFO", "{d}/fifo.pt", "not a regular file", "fifo.pt", cmd="inspect"),
    R("plan: model name too long", "{d}/" + "p" * 300 + ".pt --recipe all_3x3", "too long", "", cmd="plan"),
    # --- arch specs
    R("arch subprocess:Popen", "subprocess:Popen --recipe all_3x3", "standard-library", ""),
    R("arch shutil:rmtree", "shutil:rmtree --recipe all_3x3", "standard-library", ""),
    R("arch code:interact", "code:interact --recipe all_3x3", "standard-library", ""),
    R("arch runpy:run_path", "runpy:run_path --recipe all_3x3", "standard-library", ""),
    R("arch webbrowser:open", "webbrowser:open --recipe all_3x3", "standard-library", ""),
    R("arch posix:system", "posix:system --recipe all_3x3", "standard-library", ""),
    R("arch importlib:import_module", "importlib:import_module --recipe all_3x3", "standard-library", ""),
    R("arch torch.hub:load", "torch.hub:load --recipe all_3x3", "never used", ""),
    R("arch debugpy:listen", "debugpy:listen --recipe all_3x3", "never used", ""),
    R("--arch sys:exit with a state dict", "{d}/sd.pt --arch sys:exit --recipe all_3x3", "standard-library",
      "sd.pt"),
    R("--arch builtins:breakpoint", "{d}/sd.pt --arch builtins:breakpoint --recipe all_3x3", "standard-library",
      "sd.pt"),
    R("factory returns None", "{F}:returns_none --recipe all_3x3", "NoneType", ""),
    R("factory returns a class", "{F}:returns_class --recipe all_3x3", "not a torch.nn.Module", ""),
    R("factory raises GeneratorExit", "{F}:raises_generator_exit --recipe all_3x3", "GeneratorExit", ""),
    R("factory raises MemoryError", "{F}:raises_memory_error --recipe all_3x3", "MemoryError", ""),
    R("factory recurses forever", "{F}:raises_recursion --recipe all_3x3", "RecursionError", ""),
    R("arch names a module instance", "{F}:MODULE_INSTANCE --recipe all_3x3", "not a class or a function", ""),
    R("arch names a plain class", "{F}:Row --recipe all_3x3", "not a torch.nn.Module subclass", ""),
    R("arch empty attribute", "{F}: --recipe all_3x3", "arch", ""),
    R("arch double dot", "a..b:c --recipe all_3x3", "not a Python name", ""),
    R("arch-arg alias bomb", "timm:resnet18 --arch-arg x=" + shlex.quote(
        "[&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
        "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], "
        "&g [*f,*f,*f,*f,*f,*f,*f,*f,*f], &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]]") + " --recipe all_3x3",
      "alias", ""),
    R("arch-arg deep nesting", "timm:resnet18 --arch-arg x=" + "[" * 4000 + "]" * 4000 + " --recipe all_3x3",
      "deeper than", ""),
    R("arch-arg too long", "timm:resnet18 --arch-arg x=" + "[" * NESTED + "]" * NESTED + " --recipe all_3x3",
      "characters long", ""),
    R("arch-arg self alias", "timm:resnet18 --arch-arg " + shlex.quote("x=&a [*a]") + " --recipe all_3x3",
      "alias", ""),
    R("arch-arg huge value", "timm:resnet18 --arch-arg x=" + "9" * 200_000 + " --recipe all_3x3", "long", ""),
    R("arch-arg 5000-digit integer", "timm:resnet18 --arch-arg x=" + "9" * 5000 + " --recipe all_3x3", "x", ""),
    R("arch-arg num_classes too large", "timm:resnet18 --arch-arg num_classes=1000000000000 --recipe all_3x3",
      "num_classes", ""),
    R("arch-arg NaN width", "torchvision:resnet18 --arch-arg num_classes=.nan --recipe all_3x3", "num_classes", ""),
    # --- recipes: resources
    R("recipe alias bomb", NET.replace("all_3x3", "{d}/bomb.yaml"), "alias", "net.pt bomb.yaml"),
    R("recipe self-referencing alias", NET.replace("all_3x3", "{d}/selfref.yaml"), "alias", "net.pt selfref.yaml"),
    R("recipe self-referencing list", NET.replace("all_3x3", "{d}/selfref_list.yaml"), "alias",
      "net.pt selfref_list.yaml"),
    R("recipe 50,000-deep list", NET.replace("all_3x3", "{d}/deep_list.yaml"), "deep", "net.pt deep_list.yaml"),
    R("recipe 50,000-deep mapping", NET.replace("all_3x3", "{d}/deep_map.yaml"), "deep", "net.pt deep_map.yaml"),
    R("recipe 500-deep block mapping", NET.replace("all_3x3", "{d}/deep_block.yaml"), "deep",
      "net.pt deep_block.yaml"),
    R("recipe file too large", NET.replace("all_3x3", "{d}/huge.yaml"), "too large", "net.pt huge.yaml"),
    R("recipe is a FIFO", NET.replace("all_3x3", "{d}/fifo.yaml"), "not a regular file", "net.pt fifo.yaml"),
    R("recipe is /dev/urandom", NET.replace("all_3x3", "/dev/urandom"), "not a regular file", "net.pt"),
    R("recipe is a folder", NET.replace("all_3x3", "{d}"), "is a directory", "net.pt"),
    R("recipe name too long", NET.replace("all_3x3", "{d}/" + "r" * 300 + ".yaml"), "too long", "net.pt"),
    R("recipe not UTF-8", NET.replace("all_3x3", "{d}/latin1.yaml"), "UTF-8", "net.pt latin1.yaml"),
    R("recipe binary", NET.replace("all_3x3", "{d}/binary.yaml"), "binary.yaml", "net.pt binary.yaml"),
    R("recipe is a list", NET.replace("all_3x3", "{d}/list.yaml"), "list.yaml", "net.pt list.yaml"),
    R("recipe is a scalar", NET.replace("all_3x3", "{d}/scalar.yaml"), "scalar.yaml", "net.pt scalar.yaml"),
    R("recipe is empty", NET.replace("all_3x3", "{d}/empty.yaml"), "empty.yaml", "net.pt empty.yaml"),
    R("recipe is null", NET.replace("all_3x3", "{d}/null.yaml"), "null.yaml", "net.pt null.yaml"),
    R("recipe with tabs", NET.replace("all_3x3", "{d}/tabs.yaml"), "tabs.yaml", "net.pt tabs.yaml"),
    # --- recipes: tags and types
    R("recipe !!python/name", NET.replace("all_3x3", "{d}/pyname.yaml"), "not allowed", "net.pt pyname.yaml"),
    R("recipe !!python/object/new", NET.replace("all_3x3", "{d}/pynew.yaml"), "not allowed", "net.pt pynew.yaml"),
    R("recipe python tag on a key", NET.replace("all_3x3", "{d}/pytag_key.yaml"), "not allowed",
      "net.pt pytag_key.yaml"),
    R("recipe name is a date", NET.replace("all_3x3", "{d}/date.yaml"), "name", "net.pt date.yaml"),
    R("recipe !!set", NET.replace("all_3x3", "{d}/set.yaml"), "select.include", "net.pt set.yaml"),
    R("recipe !!binary", NET.replace("all_3x3", "{d}/binary_tag.yaml"), "name", "net.pt binary_tag.yaml"),
    R("recipe duplicate key", NET.replace("all_3x3", "{d}/dupkey.yaml"), "duplicate key", "net.pt dupkey.yaml"),
    R("recipe unknown top key", NET.replace("all_3x3", "{d}/unknown_top.yaml"), "did you mean 'select'",
      "net.pt unknown_top.yaml"),
    R("recipe invalid regex", NET.replace("all_3x3", "{d}/bad_regex.yaml"), "not a valid regex",
      "net.pt bad_regex.yaml"),
    R("recipe override without match", NET.replace("all_3x3", "{d}/override_nomatch.yaml"), "match",
      "net.pt override_nomatch.yaml"),
    R("recipe order typo", NET.replace("all_3x3", "{d}/order_typo.yaml"), "did you mean 'dw_pw'",
      "net.pt order_typo.yaml"),
    R("recipe init typo", NET.replace("all_3x3", "{d}/init_typo.yaml"), "did you mean 'svd'",
      "net.pt init_typo.yaml"),
    R("recipe mid_act unknown", NET.replace("all_3x3", "{d}/midact.yaml"), "replace.mid_act", "net.pt midact.yaml"),
    # --- recipes: regex cost
    R("regex (.*.*.*)*X", NET.replace("all_3x3", "{d}/nested_q.yaml"), "(.*.*.*)*X", "net.pt nested_q.yaml"),
    R("regex (a+)+$", NET.replace("all_3x3", "{d}/nested_plus.yaml"), "(a+)+$", "net.pt nested_plus.yaml"),
    R("regex (a|a)*X", NET.replace("all_3x3", "{d}/alt_star.yaml"), "(a|a)*X", "net.pt alt_star.yaml"),
    R("regex (\\w+\\s?)*$ in exclude", NET.replace("all_3x3", "{d}/word_space.yaml"), "select.exclude",
      "net.pt word_space.yaml"),
    R("regex nested in an override", NET.replace("all_3x3", "{d}/nested_override.yaml"), "overrides[0].match",
      "net.pt nested_override.yaml"),
    R("regex too long", NET.replace("all_3x3", "{d}/long_regex.yaml"), "too long", "net.pt long_regex.yaml"),
    R("regex a{1000000}", NET.replace("all_3x3", "{d}/big_repeat.yaml"), "repeat", "net.pt big_repeat.yaml"),
    # --- recipes: numbers
    R("depth_multiplier 1e20 (float)", NET.replace("all_3x3", "{d}/dm_float.yaml"), "replace.depth_multiplier",
      "net.pt dm_float.yaml"),
    R("depth_multiplier 10**20", NET.replace("all_3x3", "{d}/dm_big.yaml"), "replace.depth_multiplier",
      "net.pt dm_big.yaml"),
    R("depth_multiplier NaN", NET.replace("all_3x3", "{d}/dm_nan.yaml"), "replace.depth_multiplier",
      "net.pt dm_nan.yaml"),
    R("depth_multiplier true", NET.replace("all_3x3", "{d}/dm_bool.yaml"), "replace.depth_multiplier",
      "net.pt dm_bool.yaml"),
    R("depth_multiplier 10 > 3·3", NET.replace("all_3x3", "{d}/dm_10.yaml"), "kh·kw", "net.pt dm_10.yaml"),
    R("override depth_multiplier 50 > 3·3", NET.replace("all_3x3", "{d}/dm_override.yaml"), "'4'",
      "net.pt dm_override.yaml"),
    R("energy NaN", NET.replace("all_3x3", "{d}/energy_nan.yaml"), "replace.energy", "net.pt energy_nan.yaml"),
    R("energy inf", NET.replace("all_3x3", "{d}/energy_inf.yaml"), "replace.energy", "net.pt energy_inf.yaml"),
    R("min_speedup inf", NET.replace("all_3x3", "{d}/speed_inf.yaml"), "latency.min_speedup",
      "net.pt speed_inf.yaml"),
    R("min_speedup NaN", NET.replace("all_3x3", "{d}/speed_nan.yaml"), "latency.min_speedup",
      "net.pt speed_nan.yaml"),
    R("min_speedup 1e300", NET.replace("all_3x3", "{d}/speed_huge.yaml"), "latency.min_speedup",
      "net.pt speed_huge.yaml"),
    R("rounds 10**30", NET.replace("all_3x3", "{d}/rounds_huge.yaml"), "latency.rounds", "net.pt rounds_huge.yaml"),
    R("rounds 1e30 (float)", NET.replace("all_3x3", "{d}/rounds_float.yaml"), "latency.rounds",
      "net.pt rounds_float.yaml"),
    R("rounds 0", NET.replace("all_3x3", "{d}/rounds_zero.yaml"), "latency.rounds", "net.pt rounds_zero.yaml"),
    R("warmup 10**10", NET.replace("all_3x3", "{d}/warmup_huge.yaml"), "latency.warmup", "net.pt warmup_huge.yaml"),
    R("output_stride NaN", NET.replace("all_3x3", "{d}/os_nan.yaml"), "select.output_stride", "net.pt os_nan.yaml"),
    R("output_stride inf", NET.replace("all_3x3", "{d}/os_inf.yaml"), "select.output_stride", "net.pt os_inf.yaml"),
    R("output_stride min NaN", NET.replace("all_3x3", "{d}/os_min_nan.yaml"), "select.output_stride.min",
      "net.pt os_min_nan.yaml"),
    R("in_channels -3", NET.replace("all_3x3", "{d}/inch_neg.yaml"), "select.in_channels", "net.pt inch_neg.yaml"),
    R("in_channels max 10**23", NET.replace("all_3x3", "{d}/inch_huge.yaml"), "select.in_channels.max",
      "net.pt inch_huge.yaml"),
    R("out_channels min > max", NET.replace("all_3x3", "{d}/inch_swap.yaml"), "swap", "net.pt inch_swap.yaml"),
    R("kernel_size 0", NET.replace("all_3x3", "{d}/ks_zero.yaml"), "select.kernel_size", "net.pt ks_zero.yaml"),
    R("kernel_size 10**20", NET.replace("all_3x3", "{d}/ks_huge.yaml"), "select.kernel_size", "net.pt ks_huge.yaml"),
    R("kernel_size '3x0'", NET.replace("all_3x3", "{d}/ks_str.yaml"), "select.kernel_size", "net.pt ks_str.yaml"),
    R("stride inf", NET.replace("all_3x3", "{d}/stride_inf.yaml"), "select.stride", "net.pt stride_inf.yaml"),
    R("dilation -1", NET.replace("all_3x3", "{d}/dilation_neg.yaml"), "select.dilation", "net.pt dilation_neg.yaml"),
    R("recipes show: alias bomb", "{d}/bomb.yaml", "alias", "bomb.yaml", cmd="recipes show"),
    R("recipes show: nested regex", "{d}/nested_q.yaml", "(.*.*.*)*X", "nested_q.yaml", cmd="recipes show"),
    R("plan: recipe 50,000-deep", NET.replace("all_3x3", "{d}/deep_list.yaml"), "deep", "net.pt deep_list.yaml",
      cmd="plan"),
    # --- plan sidecars (a safetensors rewrite reloaded with --arch)
    R("plan is a JSON list", PAIR, "light.plan.json", "p_list"),
    R("plan is null", PAIR, "light.plan.json", "p_null"),
    R("plan is a string", PAIR, "light.plan.json", "p_string"),
    R("plan is a number", PAIR, "light.plan.json", "p_number"),
    R("plan nested 100,000 deep", PAIR, "deep", "p_deep"),
    R("plan with a deep extra key", PAIR, "deep", "p_deep_entry"),
    R("plan not UTF-8", PAIR, "UTF-8", "p_latin1"),
    R("plan empty", PAIR, "light.plan.json", "p_empty"),
    R("plan invalid JSON", PAIR, "not valid JSON", "p_badjson"),
    R("plan NaN depth multiplier", PAIR, "depth_multiplier", "p_nan"),
    R("plan format_version 99", PAIR, "format_version", "p_version"),
    R("plan entries a mapping", PAIR, "entries", "p_entries_dict"),
    R("plan entries null", PAIR, "entries", "p_entries_none"),
    R("plan entries numbers", PAIR, "entries", "p_entry_int"),
    R("plan entry without name", PAIR, "name", "p_no_name"),
    R("plan entry name an int", PAIR, "name", "p_name_int"),
    R("plan entry names no module", PAIR, "decoder.9", "p_unknown_name"),
    R("plan entry action unknown", PAIR, "explode", "p_action"),
    R("plan config a list", PAIR, "config", "p_cfg_list"),
    R("plan config extra key", PAIR, "rm_rf", "p_cfg_extra"),
    R("plan depth_multiplier 100000", PAIR, "light.plan.json: conv '2' (3×3): depth multiplier 100000", "p_dm_100k"),
    R("plan depth_multiplier 10 > 3·3", PAIR, "kh·kw", "p_dm_10"),
    R("plan depth_multiplier 0", PAIR, "depth_multiplier", "p_dm_zero"),
    R("plan depth_multiplier -4", PAIR, "depth_multiplier", "p_dm_neg"),
    R("plan depth_multiplier '9'", PAIR, "depth_multiplier", "p_dm_str"),
    R("plan depth_multiplier 1.5", PAIR, "depth_multiplier", "p_dm_float"),
    R("plan depth_multiplier 1e20", PAIR, "depth_multiplier", "p_dm_1e20"),
    R("plan depth_multiplier true", PAIR, "depth_multiplier", "p_dm_bool"),
    R("plan order unknown", PAIR, "did you mean 'dw_pw'", "p_order"),
    R("plan init unknown", PAIR, "init", "p_init"),
    R("plan mid_norm unknown", PAIR, "mid_norm", "p_midnorm"),
    R("plan mid_act unknown", PAIR, "mid_act", "p_midact"),
    R("plan arch_args a list", PAIR, "arch_args", "p_arch_args"),
    R("plan input_shape a string", PAIR, "input_shape", "p_shape"),
    R("plan file too large", PAIR, "too large", "p_huge"),
    # --- CLI options
    R("--input-shape too large to allocate", NET + " --input-shape 1,3,100000,100000", "too large"),
    R("--input-shape overflow", NET + " --input-shape 99999999999999999999,3,16,16", "too large"),
    R("--input-shape zero", NET + " --input-shape 0,3,16,16", "input-shape"),
    R("--input-shape letters", NET + " --input-shape a,b,c", "input-shape"),
    R("--input-shape wrong channels (CLI)", NET + " --input-shape 1,5,16,16", "channels"),
    R("--input-shape too large, inspect", "{d}/net.pt --input-shape 64,3,50000,50000", "too large", "net.pt",
      cmd="inspect"),
    R("--depth-multiplier 0", NET + " --depth-multiplier 0", "depth-multiplier"),
    R("--depth-multiplier 10 > 3·3", NET + " --depth-multiplier 10", "kh·kw"),
    R("--depth-multiplier 10**20", NET + " --depth-multiplier 100000000000000000000", "depth"),
    R("--depth-multiplier 1.5", NET + " --depth-multiplier 1.5", "depth-multiplier"),
    R("--order typo", NET + " --order dwpw", "order"),
    R("--init typo", NET + " --init svdd", "init"),
    R("--calib-std 0", NET + " --calib {d}/c.pt --calib-std 0", "calib-std", "net.pt c.pt"),
    R("--calib-std NaN", NET + " --calib {d}/c.pt --calib-std nan", "calib-std", "net.pt c.pt"),
    R("--calib-std inf", NET + " --calib {d}/c.pt --calib-std inf", "calib-std", "net.pt c.pt"),
    R("--calib-std negative", NET + " --calib {d}/c.pt --calib-std=-1", "calib-std", "net.pt c.pt"),
    R("--calib-std 1e-320 (subnormal)", NET + " --calib {d}/c.pt --calib-std 1e-320", "calib-std", "net.pt c.pt"),
    R("--calib-mean NaN", NET + " --calib {d}/c.pt --calib-mean nan", "calib-mean", "net.pt c.pt"),
    R("--calib-mean inf", NET + " --calib {d}/c.pt --calib-mean=-inf", "calib-mean", "net.pt c.pt"),
    R("--calib-mean letters", NET + " --calib {d}/c.pt --calib-mean a,b", "calib-mean", "net.pt c.pt"),
    R("--calib-std two values for 3 channels", NET + " --calib {d}/c.pt --calib-std 1,2", "calib-std",
      "net.pt c.pt"),
    R("--calib-size 0", NET + " --calib {d}/c_noimg --calib-size 0", "calib-size", "net.pt c_noimg"),
    R("--calib-size too large", NET + " --calib demo --calib-size 100000,100000", "too large", "net.pt"),
    R("--calib-limit 0", NET + " --calib {d}/c.pt --calib-limit 0", "calib-limit", "net.pt c.pt"),
    R("--calib-preset typo", NET + " --calib {d}/c.pt --calib-preset imagenett", "calib-preset", "net.pt c.pt"),
    R("--example-inputs missing", NET + " --example-inputs {d}/x.pt", "x.pt"),
    R("--example-inputs NaN", NET + " --example-inputs {d}/x_nan.pt", "NaN", "net.pt x_nan.pt"),
    R("--example-inputs empty", NET + " --example-inputs {d}/x_empty.pt", "empty", "net.pt x_empty.pt"),
    R("--example-inputs a string", NET + " --example-inputs {d}/x_str.pt", "x_str.pt", "net.pt x_str.pt"),
    R("--example-inputs wrong channels", NET + " --example-inputs {d}/x_chan.pt", "channels", "net.pt x_chan.pt"),
    R("--example-inputs with --input-shape", NET + " --example-inputs {d}/x_nan.pt --input-shape 1,3,8,8",
      "not both", "net.pt x_nan.pt"),
    R("--save-format safetensors, .pt output", NET + " --save-format safetensors", "safetensors"),
    R("heal --lr NaN", "{d}/net.pt --rewritten {d}/net.pt --data {d}/c.pt --lr nan -o {o}/h.pt", "lr",
      "net.pt c.pt", cmd="heal"),
    R("heal --lr inf", "{d}/net.pt --rewritten {d}/net.pt --data {d}/c.pt --lr inf -o {o}/h.pt", "lr",
      "net.pt c.pt", cmd="heal"),
    R("heal --lr negative", "{d}/net.pt --rewritten {d}/net.pt --data {d}/c.pt --lr=-0.1 -o {o}/h.pt", "lr",
      "net.pt c.pt", cmd="heal"),
    R("heal --steps 0", "{d}/net.pt --rewritten {d}/net.pt --data {d}/c.pt --steps 0 -o {o}/h.pt", "steps",
      "net.pt c.pt", cmd="heal"),
    R("heal --steps 10**12", "{d}/net.pt --rewritten {d}/net.pt --data {d}/c.pt --steps 1000000000000 -o {o}/h.pt",
      "steps", "net.pt c.pt", cmd="heal"),
    R("heal --batch-size 10**9", "{d}/net.pt --rewritten {d}/net.pt --data {d}/c.pt --batch-size 1000000000 "
      "-o {o}/h.pt", "batch-size", "net.pt c.pt", cmd="heal"),
    R("heal data NaN", "{d}/net.pt --rewritten {d}/net.pt --data {d}/c_nan.pt -o {o}/h.pt --input-shape 1,3,16,16",
      "NaN", "net.pt c_nan.pt", cmd="heal"),
    R("heal --rewritten is a FIFO", "{d}/net.pt --rewritten {d}/fifo.pt --data {d}/c.pt -o {o}/h.pt",
      "not a regular file", "net.pt c.pt fifo.pt", cmd="heal"),
    # --- calibration data
    R("calib missing", NET + " --calib {d}/nope.pt", "nope.pt"),
    R("calib empty tensor", NET + " --calib {d}/c_empty.pt", "empty", "net.pt c_empty.pt"),
    R("calib NaN", NET + " --calib {d}/c_nan.pt", "NaN", "net.pt c_nan.pt"),
    R("calib inf", NET + " --calib {d}/c_inf.pt", "inf", "net.pt c_inf.pt"),
    R("calib -inf", NET + " --calib {d}/c_ninf.pt", "inf", "net.pt c_ninf.pt"),
    R("calib wrong channels", NET + " --calib {d}/c_chan.pt", "(N, 3, H, W)", "net.pt c_chan.pt"),
    R("calib 1 channel for a 3-channel model", NET + " --calib {d}/c_gray.pt", "(N, 3, H, W)", "net.pt c_gray.pt"),
    R("calib 3-d tensor", NET + " --calib {d}/c_3d.pt", "c_3d.pt", "net.pt c_3d.pt"),
    R("calib 5-d tensor", NET + " --calib {d}/c_5d.pt", "c_5d.pt", "net.pt c_5d.pt"),
    R("calib 1-d tensor", NET + " --calib {d}/c_1d.pt", "c_1d.pt", "net.pt c_1d.pt"),
    R("calib scalar", NET + " --calib {d}/c_scalar.pt", "c_scalar.pt", "net.pt c_scalar.pt"),
    R("calib list, NaN in batch 2", NET + " --calib {d}/c_list_nan.pt", "NaN", "net.pt c_list_nan.pt"),
    R("calib list, batch 1 wrong channels", NET + " --calib {d}/c_list_chan.pt", "(2, 4, 16, 16)", "net.pt c_list_chan.pt"),
    R("calib empty list", NET + " --calib {d}/c_list_empty.pt", "c_list_empty.pt", "net.pt c_list_empty.pt"),
    R("calib list of strings", NET + " --calib {d}/c_list_str.pt", "c_list_str.pt", "net.pt c_list_str.pt"),
    R("calib dict", NET + " --calib {d}/c_dict.pt", "c_dict.pt", "net.pt c_dict.pt"),
    R("calib complex", NET + " --calib {d}/c_complex.pt", "complex", "net.pt c_complex.pt"),
    R("calib pickle payload", NET + " --calib {d}/c_payload.pt", "c_payload.pt", "net.pt c_payload.pt"),
    R("calib .npy NaN", NET + " --calib {d}/c_nan.npy", "NaN", "net.pt c_nan.npy"),
    R("calib .npy wrong channels", NET + " --calib {d}/c_chan.npy", "(N, 3, H, W)", "net.pt c_chan.npy"),
    R("calib .npy object array", NET + " --calib {d}/c_obj.npy", "c_obj.npy", "net.pt c_obj.npy"),
    R("calib .npy strings", NET + " --calib {d}/c_str.npy", "c_str.npy", "net.pt c_str.npy"),
    R("calib .npz second array wrong channels", NET + " --calib {d}/c_chan.npz", "(2, 5, 16, 16)", "net.pt c_chan.npz"),
    R("calib text file", NET + " --calib {d}/c_text.pt", "c_text.pt", "net.pt c_text.pt"),
    R("calib folder without images", NET + " --calib {d}/c_noimg", "no images", "net.pt c_noimg"),
    R("calib broken image", NET + " --calib {d}/c_badimg", "broken.png", "net.pt c_badimg"),
    R("calib FIFO", NET + " --calib {d}/fifo.npy", "not a regular file", "net.pt fifo.npy"),
    R("calib /dev/zero", NET + " --calib /dev/zero", "not a regular file", "net.pt"),
    R("calib name too long", NET + " --calib {d}/" + "c" * 300 + ".pt", "too long", "net.pt"),
    R("calib demo for a 1-channel model", "{d}/net.pt --recipe all_3x3 --calib demo --input-shape 1,1,16,16",
      "demo", "net.pt"),
    # --- found by a second probe
    R("recipe with 60,000 keys", NET.replace("all_3x3", "{d}/keys.yaml"), "100,000 nodes", "net.pt keys.yaml"),
    R("--example-inputs is a FIFO", NET + " --example-inputs {d}/x.fifo.pt", "not a regular file", "net.pt x.fifo.pt"),
    R("calib .npy header lies about its size", NET + " --calib {d}/c_lie.npy", "c_lie.npy", "net.pt c_lie.npy"),
    R("arch-arg dunder name", "timm:resnet18 --arch-arg __class__=1 --recipe all_3x3", "__class__", ""),
    R("built-in recipe name with NUL", "{d}/net.pt --recipe decoder_only\0", "did you mean 'decoder_only'", "net.pt"),
    R("model name too long, no folder", "m" * 300 + " --recipe all_3x3", "neither a file nor a model spec", ""),
    R("plan file is a FIFO", PAIR, "not a regular file", "p_fifo"),
    R("plan file is a folder", PAIR, "is a directory", "p_dir"),
    # unreadable files: root reads anything, so these skip when run as root (tests/test_input_validation.py
    # simulates the refusal of open() instead)
    R("model file unreadable", "{d}/ro_net.pt --recipe all_3x3", "Permission denied", "ro_net.pt"),
    R("recipe unreadable", NET.replace("all_3x3", "{d}/ro_recipe.yaml"), "Permission denied", "net.pt ro_recipe.yaml"),
    R("calib unreadable", NET + " --calib {d}/ro_calib.pt", "Permission denied", "net.pt ro_calib.pt"),
    # --- outputs (13b owns these; a few that work already)
    R("-o is the input", NET + " -o {d}/net.pt", "net.pt"),
    R("-o exists, no --force", NET + " -o {d}/c.pt", "exists", "net.pt c.pt"),
    R("-o in a missing folder", NET + " -o {o}/no/such/dir/light.pt", "no/such/dir"),
    R("--report bad suffix", NET + " --report {o}/r.xlsx", ".xlsx"),
]
DEFAULT_FILES = {"c.pt": _save(_x((4, 3, 16, 16)))}


def _make(d: Path, name: str) -> None:
    if name in TEXTS:
        text = TEXTS[name]
        data = text if isinstance(text, bytes) else text.replace("{m}", str(d / "PWNED")).encode("utf-8")
        (d / name).write_bytes(data)
    elif name in DEFAULT_FILES:
        DEFAULT_FILES[name](d / name)
    else:
        MAKERS[name](d / name)


def _digest(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_fifo():
            out[rel] = "fifo"
        elif p.is_dir():
            out[rel] = "dir"
        elif not os.access(p, os.R_OK):  # an unreadable input: its size and time stand for its bytes
            st = p.stat()
            out[rel] = f"unreadable {st.st_size} {st.st_mtime_ns}"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class _Timeout(Exception):
    pass


def _alarm(*_: Any) -> None:
    raise _Timeout()


def test_the_table_is_wide_and_ids_are_unique() -> None:
    assert len(ROWS) >= 150, len(ROWS)
    assert len({r.id for r in ROWS}) == len(ROWS)
    unknown = {f for r in ROWS for f in r.files} - set(TEXTS) - set(MAKERS) - set(DEFAULT_FILES)
    assert not unknown, unknown


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_fails_cleanly(row: Row, tmp_path: Path) -> None:
    if sys.platform == "win32":
        pytest.skip("POSIX paths")
    if any(f.startswith("ro_") for f in row.files) and os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root from reading")
    d, o = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    o.mkdir()
    for name in row.files:
        _make(d, name)
    argv = row.argv.replace("{d}", str(d)).replace("{o}", str(o)).replace("{F}", F)
    args = shlex.split(argv) if "\0" not in argv else argv.split(" ")
    if row.cmd in ("apply", "plan", "inspect") and "--input-shape" not in args and "--example-inputs" not in args:
        args += ["--input-shape", SHAPE_ARG]
    if row.cmd == "apply" and "-o" not in args:
        args += ["-o", str(o / "light.pt")]
    before = _digest(d)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    try:
        r = run_cli([*row.cmd.split(), *args])
    except _Timeout:
        pytest.fail(f"{row.id}: still running after {TIME_LIMIT_S} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert_clean_cli_error(row.id, r, (row.fragment,))
    assert r.exit_code == row.code
    assert _digest(d) == before, f"{row.id}: the inputs changed"
    assert sorted(p.name for p in o.iterdir()) == [], f"{row.id}: wrote {list(o.iterdir())}"
    assert not (d / "PWNED").exists() and not (o / "PWNED").exists(), f"{row.id}: a payload ran"
