"""Adapter files: ``adapter_config.json`` (the metadata: base model, fingerprints, method config, extra keys) and
``adapter.safetensors`` (the trainable tensors), read with their checks and written atomically.

Every key of ``adapter_config.json`` is a field of :class:`AdapterMeta`; code reads the metadata through it
(:func:`read_adapter_meta`), never the raw JSON. Configs written by older versions (no ``format_version``, no
fingerprints, no ``classifier`` entry) load with those fields None."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field

from safetensors.torch import load as load_safetensors

from .errors import UserError
from .methods import METHODS
from .outputs import atomic_write_files

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``path`` atomically (see :func:`ltuning.outputs.atomic_write_files`)."""
    atomic_write_files({path: data})


@dataclass
class AdapterMeta:
    """The content of ``adapter_config.json``.

    ``method_config``: the method's config (``MethodConfig.to_dict()``). ``base_fingerprint`` / ``base_identity``:
    the base model the adapter was trained on (:func:`ltuning.models.fingerprint`, ``base_identity``).
    ``weights_sha256``: checksum of ``adapter.safetensors``. ``cache_keys``: state-dict keys of base-derived
    buffers (label-text encodings), valid only on the same base and label texts. ``classifier``: how the
    high-level API loads it again (``model``, ``dtype``, ``max_length``, ``quantize``). ``multitask``: the tasks of
    a multi-task adapter (``tasks``: names in model order; ``labels``: {task: label names}); None for one task.
    ``extra``: keys this version does not know (kept when the file is written again)."""
    base_model: str
    method_config: dict
    format_version: int | None = FORMAT_VERSION
    base_fingerprint: str | None = None
    base_identity: dict | None = None
    weights_sha256: str | None = None
    cache_keys: list | None = None
    classifier: dict | None = None
    multitask: dict | None = None
    extra: dict = field(default_factory=dict)

    KEYS = ("format_version", "base_model", "base_fingerprint", "base_identity", "weights_sha256", "method_config",
            "cache_keys", "multitask", "classifier")

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterMeta":
        known = {k: d[k] for k in cls.KEYS if k in d}
        known.setdefault("format_version", None)
        return cls(**known, extra={k: v for k, v in d.items() if k not in cls.KEYS})

    def to_dict(self) -> dict:
        """The JSON object (keys in the order earlier versions wrote them; None entries of optional keys left out)."""
        out = {k: getattr(self, k) for k in self.KEYS}
        out = {k: v for k, v in out.items() if v is not None or k in ("base_model", "method_config")}
        return {**out, **self.extra}

    # -- what readers ask for
    @property
    def method(self) -> str:
        return self.method_config["method"]

    @property
    def label_names(self) -> list:
        return list(self.method_config["label_names"])

    @property
    def model_name(self) -> str:
        """The base model to load: the name the high-level API recorded, else the backbone's own name."""
        return (self.classifier or {}).get("model") or self.base_model

    @property
    def dtype(self) -> str:
        return (self.classifier or {}).get("dtype", "fp32")

    @property
    def max_length(self) -> int:
        return int((self.classifier or {}).get("max_length", 128))

    @property
    def quantize(self) -> str | None:
        return (self.classifier or {}).get("quantize")

    @property
    def task_labels(self) -> dict | None:
        """``{task: label names}`` in model order for a multi-task adapter, else None."""
        return None if self.multitask is None else dict(self.multitask["labels"])


def read_adapter_meta(directory: str) -> AdapterMeta:
    """:func:`read_adapter_config` as an :class:`AdapterMeta`."""
    return AdapterMeta.from_dict(read_adapter_config(directory))


def read_adapter_weights(directory: str, meta: AdapterMeta | None = None) -> dict:
    """The adapter's tensors, checked against the sha256 its config records (a truncated or corrupted
    ``adapter.safetensors`` raises :class:`UserError` naming the file)."""
    meta = read_adapter_meta(directory) if meta is None else meta
    wpath = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        raise UserError(f"no such file; expected the adapter weights beside {CONFIG_NAME}", wpath)
    with open(wpath, "rb") as f:
        raw = f.read()
    want = meta.weights_sha256
    if want is not None and hashlib.sha256(raw).hexdigest() != want:
        raise UserError(f"checksum differs from the one in {CONFIG_NAME}: the file is truncated or corrupted; "
                        "expected the weights written with that config (retrain or restore the file)", wpath)
    try:
        return load_safetensors(raw)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a broken header
        raise UserError(f"not a readable safetensors file ({' '.join(str(e).split())}); expected the adapter "
                        "weights written by ltuning", wpath) from None


REQUIRED_KEYS = {"base_model": str, "method_config": dict}


def warn_if_other_precision(saved: str | None, current: str) -> bool:
    """Warn when an adapter trained on a quantized base is loaded on a full-precision one or the reverse (the
    fingerprint's suffix names the quantization, see :func:`ltuning.models.fingerprint`)."""
    if not saved:
        return False
    (h0, _, q0), (h1, _, q1) = saved.partition("-"), current.partition("-")
    if h0 == h1 and q0 != q1:
        warnings.warn(f"adapter trained on a {q0 or 'full-precision'} base, loaded on a {q1 or 'full-precision'} "
                      "one: scores will differ slightly (base-derived buffers are re-encoded)", UserWarning,
                      stacklevel=3)
        return True
    return False


def read_adapter_config(directory: str) -> dict:
    """The adapter's ``adapter_config.json`` as a dict (:func:`read_adapter_meta` gives the fields), checked: valid JSON, the required keys, a known method and label
    names. Problems raise :class:`UserError` naming the file (and line, for invalid JSON)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory; expected an adapter directory written by "
                                "'ltuning train'")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no adapter here (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON ({e.msg})", path, e.lineno) from None
    except UnicodeDecodeError:
        raise UserError("invalid UTF-8; expected a JSON file", path) from None
    if not isinstance(meta, dict):
        raise UserError(f"expected a JSON object, got {type(meta).__name__}", path)
    for key, typ in REQUIRED_KEYS.items():
        if not isinstance(meta.get(key), typ):
            raise UserError(f"missing key {key!r}; expected a {typ.__name__} (a config written by ltuning)"
                            if key not in meta else f"key {key!r} is a {type(meta[key]).__name__}; expected a "
                            f"{typ.__name__}", path)
    mc = meta["method_config"]
    if mc.get("method") not in METHODS:
        what = "missing key 'method_config.method'" if "method" not in mc else f"unknown method {mc['method']!r}"
        raise UserError(f"{what}; expected one of {', '.join(sorted(METHODS))}", path)
    names = mc.get("label_names")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        raise UserError("missing or invalid key 'method_config.label_names'; expected a list of at least two "
                        "class names", path)
    return meta
