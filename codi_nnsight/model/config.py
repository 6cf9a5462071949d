"""CODI model description: the `codi.json` file, its dataclass, and the built-in presets."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

#: Most continuous thoughts a config may ask for. Each thought is one position of the model's
#: context; no supported model is run with thousands of them, and an absurd count (10**6) would
#: otherwise allocate and loop for minutes before failing.
MAX_NUM_LATENT = 4096
#: Largest LoRA rank and projection width accepted: far above any real checkpoint, low enough that
#: a typo is refused instead of allocating gigabytes.
MAX_LORA_R = 65536
MAX_PRJ_DIM = 65536
#: Fields whose values (not only types) are checked.
_CHECKED = ("num_latent", "lora_r", "lora_alpha", "prj_dim")


def _is_int(value: Any) -> bool:
    # bool is an int subclass: a `true` where a number belongs is a typo, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """``value`` for a message; a huge integer by its size, not thousands of digits."""
    if _is_int(value) and abs(value) >= 10**20:
        return f"an integer of {len(str(abs(value)))} digits"
    return repr(value)


#: Integer fields: (smallest, largest, what the smallest means when it is a boundary to explain).
_INT_BOUNDS: dict[str, tuple[int, int, str]] = {
    "num_latent": (0, MAX_NUM_LATENT, ""),
    "lora_r": (0, MAX_LORA_R, ""),
    # 0 used to mean "the hidden size" silently; null says that explicitly.
    "prj_dim": (1, MAX_PRJ_DIM, " (or null for the hidden size)"),
}


def _value_error(key: str, value: Any) -> str | None:
    """Why ``value`` is unusable for the numeric field ``key`` (completes "num_latent ..."), or None."""
    if key == "lora_alpha":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {_shown(value)}"
        try:
            finite = math.isfinite(float(value))
        except OverflowError:  # an integer beyond float
            finite = False
        return None if finite else f"must be a finite number, got {_shown(value)}"
    if key == "prj_dim" and value is None:
        return None
    low, high, note = _INT_BOUNDS[key]
    if not _is_int(value):
        return f"must be an integer{' or null' if key == 'prj_dim' else ''}, got {_shown(value)}"
    if value < low:
        return f"must be {'>= 0' if low == 0 else '> 0'}{note}, got {_shown(value)}"
    if value > high:
        why = " (each thought takes a context position)" if key == "num_latent" else ""
        return f"must be <= {high}{why}, got {_shown(value)}"
    return None


class ModelFile:
    """What every model config file (`codi.json`, `coconut.json`) does alike: a dataclass with `base`,
    `checkpoint`, `name` and a not-serialized `root`, whose `base_path` / `checkpoint_path` resolve
    relative paths."""

    def display_name(self) -> str:
        """A short human name for titles and provenance."""
        return self.name or Path(self.checkpoint).parent.name or self.base  # type: ignore[attr-defined]

    def to_dict(self, resolved: bool = False) -> dict[str, Any]:
        """The json-ready dict (with absolute paths when `resolved`)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "root"}  # type: ignore[arg-type]
        if resolved:
            d["base"] = self.base_path  # type: ignore[attr-defined]
            d["checkpoint"] = self.checkpoint_path  # type: ignore[attr-defined]
        return d

    def to_json(self, resolved: bool = False) -> str:
        """Canonical JSON (sorted keys) — also what the NDIF model key carries."""
        return json.dumps(self.to_dict(resolved=resolved), sort_keys=True)


@dataclass
class CODIConfig(ModelFile):
    """Everything needed to rebuild a CODI model.

    `base` is a local directory or a Hugging Face id holding the tokenizer and config of the base LM;
    `checkpoint` is a `model.safetensors` / `pytorch_model.bin` file (a local path, or
    `hf://<repo id>/<file>` for a file on the hub) with the state_dict of the official `CODI` module.
    """

    base: str
    checkpoint: str
    num_latent: int = 6
    lora_r: int = 128
    lora_alpha: int = 32
    lora_target_modules: list[str] | None = None
    prj_dim: int | None = None
    use_prj: bool = True
    prj_no_ln: bool = False
    remove_eos: bool = True
    name: str | None = None
    revision: str | None = None
    #: Folder of the json the config came from (not serialized; resolves relative paths).
    root: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for key in _CHECKED:
            err = _value_error(key, getattr(self, key))
            if err is not None:
                raise UserError(f"codi config: {key} {err}")

    # -- paths -------------------------------------------------------------------------------
    def _resolve(self, value: str) -> str:
        """Resolve a relative local path against the json's folder; leave hub ids alone."""
        if value.startswith("hf://") or self.root is None or Path(value).is_absolute():
            return value
        candidate = Path(self.root) / value
        # "gpt2" is a hub id unless a folder of that name sits beside the json.
        if candidate.exists():
            return str(candidate)
        if value.startswith((".", "~")) or value.count("/") != 1 and ("/" in value or "\\" in value):
            # Looks like a path, not an `owner/name` hub id: say so instead of asking the hub for it.
            raise UserError(f"base {value!r}: no such folder beside {self.root} (and not a hub id owner/name)")
        return value

    @property
    def base_path(self) -> str:
        """The base LM location with relative paths resolved."""
        return self._resolve(self.base)

    @property
    def checkpoint_path(self) -> str:
        """The checkpoint location with relative paths resolved."""
        if self.checkpoint.startswith("hf://") or self.root is None:
            return self.checkpoint
        p = Path(self.checkpoint)
        return str(p if p.is_absolute() else Path(self.root) / p)

    # -- (de)serialization: `to_dict` / `to_json` / `display_name` come from `ModelFile` ------
    @classmethod
    def from_dict(cls, data: Any, source: str = "codi config", root: str | None = None) -> CODIConfig:
        """Build from a parsed json object, rejecting unknown keys and wrong types."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "root"}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(known))}"
            )
        for key in ("base", "checkpoint"):
            if key not in data:
                raise UserError(f"{source}: missing required key {key!r}")
        types: dict[str, tuple[type, ...]] = {
            "base": (str,),
            "checkpoint": (str,),
            "num_latent": (int,),
            "lora_r": (int,),
            "lora_alpha": (int, float),
            "lora_target_modules": (list, type(None)),
            "prj_dim": (int, type(None)),
            "use_prj": (bool,),
            "prj_no_ln": (bool,),
            "remove_eos": (bool,),
            "name": (str, type(None)),
            "revision": (str, type(None)),
        }
        for key, value in data.items():
            ok = isinstance(value, types[key])
            # bool is an int subclass: a `true` where a number belongs is a typo, not a 1.
            if isinstance(value, bool) and bool not in types[key]:
                ok = False
            if key == "lora_target_modules" and isinstance(value, list):
                ok = all(isinstance(v, str) for v in value)
            if not ok:
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types[key])
                raise UserError(f"{source}: key {key!r} must be {want}, got {json.dumps(value)}")
            err = _value_error(key, value) if key in _CHECKED else None
            if err is not None:  # named by file and key, before any model is built
                raise UserError(f"{source}: {key} {err}")
        return cls(**data, root=root)

    @classmethod
    def from_json(cls, path: str | Path) -> CODIConfig:
        """Read a `codi.json` file (relative paths resolve against its folder; for a symlink, the folder
        of the file it points to)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 (byte {e.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        # Relative paths belong to the real file: a codi.json symlinked elsewhere keeps its model.
        return cls.from_dict(data, source=str(path), root=str(path.resolve().parent))

    def save(self, path: str | Path) -> None:
        """Write this config as a `codi.json` (paths as given, not resolved)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


#: Public CODI checkpoints (need internet; the checkpoint file is fetched from the hub).
PRESETS: dict[str, CODIConfig] = {
    "codi-gpt2": CODIConfig(
        base="gpt2",
        checkpoint="hf://zen-E/CODI-gpt2/pytorch_model.bin",
        num_latent=6,
        lora_r=128,
        lora_alpha=32,
        prj_dim=768,
        remove_eos=True,
        name="CODI-gpt2",
    ),
    "codi-llama3.2-1b": CODIConfig(
        base="meta-llama/Llama-3.2-1B-Instruct",
        checkpoint="hf://zen-E/CODI-llama3.2-1b-Instruct/pytorch_model.bin",
        num_latent=6,
        lora_r=128,
        lora_alpha=32,
        prj_dim=2048,
        remove_eos=True,
        name="CODI-llama3.2-1b-Instruct",
    ),
}
PRESETS["zen-E/CODI-gpt2"] = PRESETS["codi-gpt2"]
PRESETS["zen-E/CODI-llama3.2-1b-Instruct"] = PRESETS["codi-llama3.2-1b"]


#: The toy models shipped inside the package, by the `--model` name that loads them: their
#: config file under `assets/` (the toy CODI is also the default when no model is given).
BUNDLED = {"toy-codi": "toy-codi/codi.json", "toy-coconut": "toy-coconut/coconut.json"}
DEFAULT_BUNDLED = "toy-codi"


def bundled_model_dir(name: str = DEFAULT_BUNDLED) -> Path:
    """Folder of a toy model shipped inside the package (default: the toy CODI)."""
    return Path(__file__).resolve().parent.parent / "assets" / Path(BUNDLED[name]).parent


def bundled_config(name: str = DEFAULT_BUNDLED) -> Any:
    """The config of the bundled toy model `name` (`toy-codi`, `toy-coconut`)."""
    path = bundled_model_dir(name) / Path(BUNDLED[name]).name
    if not path.exists():
        raise UserError(f"--model {name}: the bundled model is not installed ({path} is missing)")
    return config_from_json(path)


#: Each method's config file name (a json naming no `method` is CODI's).
METHOD_FILES = {"codi": "codi.json", "coconut": "coconut.json"}
#: The config class of each method other than CODI, by "module:class": named, not imported, since
#: those modules build on this one.
CONFIG_CLASSES = {"coconut": "codi_nnsight.model.coconut_checkpoint:CoconutConfig"}


def _config_class(method: str) -> Any:
    import importlib

    module, _, name = CONFIG_CLASSES[method].partition(":")
    return getattr(importlib.import_module(module), name)


def config_from_dict(data: Any, source: str, root: str | None = None) -> Any:
    """A `CODIConfig`, or the config class of the method the dict names under `method`."""
    method = data.get("method", "codi") if isinstance(data, dict) else "codi"
    if method == "coconut":
        return _config_class("coconut").from_dict(data, source=source, root=root)
    return CODIConfig.from_dict(data, source=source, root=root)


def config_from_json(path: str | Path) -> Any:
    """Read a model config json (`codi.json`, or a `coconut.json` naming `"method": "coconut"`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return CODIConfig.from_json(path)  # it words the one-line error
    if isinstance(data, dict) and data.get("method", "codi") == "coconut":
        return _config_class("coconut").from_json(path)
    return CODIConfig.from_json(path)


def resolve_model_spec(spec: Any) -> Any:
    """Turn a `--model` value (a codi.json or coconut.json, a folder holding one, a preset, or None) into a config."""
    if isinstance(spec, CODIConfig) or getattr(spec, "method", None) == "coconut":
        return spec
    if spec is None:
        path = bundled_model_dir() / "codi.json"
        if not path.exists():
            raise UserError("no --model given and the bundled toy model is not installed")
        return CODIConfig.from_json(path)
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        found = [p / f for f in METHOD_FILES.values() if (p / f).exists()]
        if not found:
            raise UserError(f"{p}: folder holds no codi.json (or coconut.json)")
        if len(found) > 1:
            raise UserError(f"{p}: folder holds both codi.json and coconut.json; give the json file itself")
        return config_from_json(found[0])
    if p.suffix == ".json" or p.exists():
        return config_from_json(p)
    if s in BUNDLED:
        return bundled_config(s)
    if s in PRESETS:
        return dataclasses.replace(PRESETS[s])
    raise UserError(
        f"--model {s!r}: not a codi.json or coconut.json file, a folder holding one, a bundled toy "
        f"({', '.join(BUNDLED)}) or a preset ({', '.join(sorted(PRESETS))})"
    )


# --------------------------------------------------------------------------- hub access

#: Seconds to wait for a TCP connection to the hub before calling it unreachable.
HUB_CONNECT_TIMEOUT = 3.0
_TRUE = ("1", "on", "yes", "true")
#: Files that say a base model's config and tokenizer are in the local cache (any tokenizer file will do).
_BASE_CONFIG = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def hub_resources(cfg: CODIConfig) -> list[tuple[str, str, str | None]]:
    """What loading `cfg` would fetch from the Hugging Face hub: `(repo id, file, revision)` rows.

    The base counts unless it is a local folder (its config and a tokenizer file stand for it);
    the checkpoint counts when it is `hf://owner/repo/file`.
    """
    out: list[tuple[str, str, str | None]] = []
    base = cfg.base_path
    if not Path(base).is_dir():
        out.append((base, _BASE_CONFIG, None))
    if cfg.checkpoint_path.startswith("hf://"):
        parts = cfg.checkpoint_path[len("hf://") :].split("/")
        if len(parts) >= 3:
            out.append(("/".join(parts[:2]), "/".join(parts[2:]), cfg.revision))
    return out


def _cached(repo: str, filename: str, revision: str | None) -> bool:
    """Whether the hub file is in the local cache (for a base's config: also one of its tokenizer files)."""
    from huggingface_hub import try_to_load_from_cache

    def one(name: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo, name, revision=revision), str)
        except Exception:  # a malformed repo id: not cached, and the load will say why
            return False

    if filename == _BASE_CONFIG:
        return one(_BASE_CONFIG) and any(one(t) for t in _TOKENIZER_FILES)
    return one(filename)


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`)."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The hub address downloads go to (`HF_ENDPOINT`, else huggingface_hub's default)."""
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except ImportError:
        return "https://huggingface.co"


def _proxied() -> bool:
    return any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    )


def hub_unreachable(endpoint: str, timeout: float = HUB_CONNECT_TIMEOUT) -> str | None:
    """Why a TCP connection to `endpoint` fails within `timeout` seconds, or None when it opens.

    Only the TCP handshake is tried (no request is sent). Name resolution has no timeout of its
    own, so the attempt runs in a thread that is abandoned after `timeout`. Behind a proxy the
    direct connection says nothing about reachability, so then None is returned untried.
    """
    if _proxied():
        return None
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return f"{endpoint!r} is not a URL"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"{endpoint!r} has a bad port"
    outcome: dict[str, str | None] = {}

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome["error"] = None
        except OSError as e:
            outcome["error"] = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)

    thread = threading.Thread(target=attempt, daemon=True, name="codi-nnsight-hub-probe")
    thread.start()
    thread.join(timeout + 0.5)
    if "error" not in outcome:
        return f"no connection within {timeout:g} s"
    return outcome["error"]


def _label(cfg: CODIConfig) -> str:
    preset = next((k for k, v in PRESETS.items() if v == cfg), None)
    return f"preset {preset}" if preset else f"model {cfg.display_name()}"


#: Hub organisations whose models are gated (a licence to accept and a token to present).
GATED_ORGS = ("meta-llama/",)


def check_hub_access(cfg: CODIConfig, timeout: float = HUB_CONNECT_TIMEOUT) -> None:
    """Fail fast, in one line, when `cfg` needs the hub and the hub is off or out of reach.

    Without this, transformers and huggingface_hub retry each file for about half a minute,
    printing every retry, before failing. Files already in the local cache load with
    `HF_HUB_OFFLINE=1`; a model with only local paths never needs the hub.

    Raises:
        UserError: naming the model (the preset when it is one) and how to run without the hub.
    """
    needed = hub_resources(cfg)
    if not needed:
        return
    label = _label(cfg)
    local = (
        "or use a local codi.json whose base is a folder with the base model's config and tokenizer and whose "
        "checkpoint is a local file (README, 'Real CODI models')"
    )
    missing = [f"{repo}/{name}" for repo, name, rev in needed if not _cached(repo, name, rev)]
    gated = sorted({repo for repo, name, rev in needed if repo.startswith(GATED_ORGS) and f"{repo}/{name}" in missing})
    if gated:  # a plain download would fail later for want of a licence and a token, not of a network
        local += (
            f"; {', '.join(gated)} {'is' if len(gated) == 1 else 'are'} gated on the hub: accept the licence "
            "on its page and log in (huggingface-cli login, or HF_TOKEN) before downloading"
        )
    if hub_offline():
        if missing:
            raise UserError(
                f"{label}: needs {', '.join(missing)} from the Hugging Face hub, which is switched off "
                f"(HF_HUB_OFFLINE=1) and not in the local cache; download it once online, {local}"
            )
        return
    endpoint = hub_endpoint()
    reason = hub_unreachable(endpoint, timeout)
    if reason is None:
        return
    if not missing:
        raise UserError(
            f"{label}: the Hugging Face hub ({endpoint}) cannot be reached ({reason}); its files are in "
            "the local cache: set HF_HUB_OFFLINE=1 to use them"
        )
    raise UserError(
        f"{label}: needs {', '.join(missing)} from the Hugging Face hub, which cannot be reached at "
        f"{endpoint} ({reason}); connect and retry, {local}"
    )
