"""Adapter directories a hostile user (or a bad day) produces, written for real under an
allowed directory: links that leave it, files that are not what their names say, configs and
headers nested 200,000 levels deep, NaN and huge weights, and a copy whose files vanish."""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass

from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
SECRET = b"SECRETS!" + b"do not echo me " * 4
DEEP = 200_000


@dataclass
class Battery:
    allowed: str  # the server's --allowed-lora-dirs
    outside: str  # a directory the server must never read from
    dirs: dict  # case name -> adapter directory (all inside `allowed`)


def build_battery(root: str, adapters: dict[str, str]) -> Battery:
    allowed = os.path.join(root, "allowed")
    outside = os.path.join(root, "outside")
    os.makedirs(allowed)
    os.makedirs(outside)
    with open(os.path.join(outside, "secret.bin"), "wb") as f:
        f.write(SECRET)
    shutil.copytree(adapters["lawyer"], os.path.join(outside, "lawyer"))
    source = adapters["lawyer"]
    dirs = {}

    def copy(name: str, of: str = source) -> str:
        target = os.path.join(allowed, name)
        shutil.copytree(of, target)
        dirs[name] = target
        return target

    for name in ("good", "vanish", "churn_a", "churn_b"):
        copy(name, adapters["chef"] if name.startswith("churn") else source)
    # A file link that leaves the allowed directory (the weights are elsewhere).
    linked = copy("file_link_out")
    os.remove(os.path.join(linked, WEIGHTS))
    os.symlink(os.path.join(outside, "lawyer", WEIGHTS), os.path.join(linked, WEIGHTS))
    # The config linked outside, too.
    linked = copy("config_link_out")
    os.remove(os.path.join(linked, CONFIG))
    os.symlink(os.path.join(outside, "lawyer", CONFIG), os.path.join(linked, CONFIG))
    # A directory link inside the allowed directory that leads outside it.
    os.symlink(os.path.join(outside, "lawyer"), os.path.join(allowed, "dir_link_out"))
    dirs["dir_link_out"] = os.path.join(allowed, "dir_link_out")
    # Weights that are not a safetensors file (their first bytes must not be echoed).
    fake = copy("not_safetensors")
    with open(os.path.join(fake, WEIGHTS), "wb") as f:
        f.write(SECRET)
    # A link to a secret inside the allowed directory, named like weights.
    with open(os.path.join(allowed, "secret.bin"), "wb") as f:
        f.write(SECRET)
    linked = copy("link_to_secret")
    os.remove(os.path.join(linked, WEIGHTS))
    os.symlink(os.path.join(allowed, "secret.bin"), os.path.join(linked, WEIGHTS))
    # adapter_config.json and the safetensors header nested 200,000 levels deep.
    deep = copy("deep_config")
    with open(os.path.join(deep, CONFIG), "w") as f:
        f.write('{"r": ' + "[" * DEEP + "]" * DEEP + "}")
    deep = copy("deep_header")
    header = ('{"a": ' + "[" * DEEP + "]" * DEEP + "}").encode()
    with open(os.path.join(deep, WEIGHTS), "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    # Non-finite and huge weights.
    for name, poison in (("nan", float("nan")), ("inf", float("inf")), ("huge", 1e30)):
        target = copy(name)
        tensors = load_file(os.path.join(target, WEIGHTS))
        key = min(k for k in tensors if "lora_B" in k)
        values = tensors[key].clone()
        values.view(-1)[0 if name != "huge" else slice(None)] = poison
        tensors[key] = values
        save_file(tensors, os.path.join(target, WEIGHTS))
        dirs[name + "_tensor"] = key
    # A config that is not a PEFT LoRA config at all.
    bad = copy("bad_config")
    with open(os.path.join(bad, CONFIG), "w") as f:
        json.dump({"peft_type": "LORA", "r": "many", "target_modules": 7}, f)
    return Battery(allowed, outside, dirs)

