"""A GGUF file or split set (`-00001-of-0000N.gguf`) opened as a checkpoint under hub names.

gguf-py's `GGUFReader` parses the headers (metadata and tensor infos; it maps the file but touches
only header pages); tensor bytes are then read with the same `pread` as safetensors shards, one
expert of a stack at a time. Tensors are presented as the family's hub checkpoint would hold them
(zoo/gguf_arch.py): an expert stack `blk.L.ffn_gate_exps.weight` [E, N, K] becomes E per-expert
`...experts.{e}.gate_proj.weight` [N, K], each a view of its slice of the file; llama.cpp's q/k
row permutation is undone on read; config.json is rebuilt from the GGUF keys. Quantized tensors
are U8 rows plus a `ggml_type` companion (codecs/ggml.py), so detection, every recipe and verify
read a GGUF like any other checkpoint.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import torch

from moeport.codecs.ggml import MARKER, GgmlCodec, block_geometry, marker
from moeport.dtypes import nbytes_of, torch_dtype_of
from moeport.errors import MoeportError
from moeport.sources.checkpoint import Checkpoint, FileIdentity, TensorInfo
from moeport.zoo.gguf_arch import GgufArch, arch_named, merge_kv_b, rope_rows

SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_FLOATS = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64"}
_INTS = {"I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}
MOEPORT_KEY = "moeport.recipe"  # where a GGUF moeport wrote records its recipe (verify reads it)


class GgufCheckpoint(Checkpoint):
    """A GGUF file (or split set) seen as the hub checkpoint of its family (see module doc)."""

    def __init__(self, root: Path, files: list[Path], identities: dict[Path, FileIdentity]):
        self.root = root
        self.files = files
        self.identities = identities
        self._info: dict[str, TensorInfo] = {}
        self._markers: dict[str, Any] = {}  # `ggml_type` part -> its GGML type
        self._permute: dict[str, torch.Tensor] = {}  # q/k weight -> the rows llama.cpp permuted
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()
        readers = [_reader(f) for f in files]
        self.kv = _fields(readers[0])
        _check_split(files, readers)
        arch_name = self.kv.get("general.architecture")
        if not isinstance(arch_name, str):
            raise MoeportError(f"{files[0]}: no 'general.architecture' key")
        self.arch = arch_named(arch_name, str(files[0]))
        recipe = self.kv.get(MOEPORT_KEY)
        self.metadata = {f: ({"moeport": recipe} if isinstance(recipe, str) else {}) for f in files}
        self._mla: dict[str, tuple[TensorInfo, Any, TensorInfo, Any]] = {}
        for path, reader in zip(files, readers, strict=True):
            for t in reader.tensors:
                self._add(path, t)
        if self.arch.mla:
            self._merge_mla()
        self.config = gguf_config(self.arch, self.kv, self._info)
        del readers

    def _add(self, path: Path, t: Any) -> None:
        hub, stacked = self.arch.hub_name(t.name)
        ne = [int(d) for d in t.shape]
        shape = tuple(reversed(ne))
        kind = t.tensor_type.name
        dtype = _FLOATS.get(kind) or _INTS.get(kind) or "U8"
        if dtype == "U8":  # a block type: rows of bytes
            block, size = block_geometry(t.tensor_type)
            if ne[0] % block:
                raise MoeportError(f"{path}: tensor '{t.name}' has {ne[0]} columns, not whole {kind} blocks")
            shape = (*shape[:-1], ne[0] // block * size)
        nbytes = int(t.n_bytes)
        if stacked:
            if len(shape) != 3 - t.name.endswith(".bias"):  # GPT-OSS's expert biases: [E, N]
                want = "[E, N]" if t.name.endswith(".bias") else "[E, N, K]"
                raise MoeportError(f"{path}: expert stack '{t.name}' is {list(shape)}, expected {want}")
            per = nbytes // shape[0]
            for e in range(shape[0]):
                name = hub.replace("{E}", str(e))
                self._put(path, name, TensorInfo(dtype, shape[1:], path, per, int(t.data_offset) + e * per))
                if dtype == "U8":
                    self._marker(name, t.tensor_type)
            return
        self._put(path, hub, TensorInfo(dtype, shape, path, nbytes, int(t.data_offset)))
        if dtype == "U8":
            self._marker(hub, t.tensor_type)
        heads = self.arch.permuted_heads(hub, self.config_heads())
        if heads:
            self._permute[hub] = torch.argsort(rope_rows(shape[0], heads))

    def config_heads(self) -> tuple[int, int]:
        a = self.arch.arch
        heads = int(self.kv.get(f"{a}.attention.head_count", 0))
        return heads, int(self.kv.get(f"{a}.attention.head_count_kv", heads))

    def _put(self, path: Path, name: str, info: TensorInfo) -> None:
        if name in self._info:
            raise MoeportError(f"{path}: tensor '{name}' stored twice")
        self._info[name] = info

    def _marker(self, weight: str, qtype: Any) -> None:
        name = weight.removesuffix(".weight") + "." + MARKER
        self._markers[name] = qtype
        # no bytes of its own: it stands for the type id (codecs/ggml.py)
        self._info[name] = TensorInfo("U8", block_geometry(qtype), self._info[weight].file, 0, 0)

    def _merge_mla(self) -> None:
        """llama.cpp stores MLA's kv_b_proj as k_b (transposed) and v_b; the hub form is one
        tensor, presented as such (float32 when a half is quantized: it is small, and a
        transposed block-quantized half cannot be moved without decoding it)."""
        for k_name in [n for n in self._info if n.endswith("self_attn.k_b_proj.weight")]:
            v_name = k_name.replace("k_b_proj", "v_b_proj")
            if v_name not in self._info:
                raise MoeportError(f"{self.files[0]}: '{k_name}' (attn_k_b) without its attn_v_b")
            halves = []
            for name in (k_name, v_name):
                info = self._info.pop(name)
                qtype = self._markers.pop(name.removesuffix(".weight") + "." + MARKER, None)
                self._info.pop(name.removesuffix(".weight") + "." + MARKER, None)
                halves += [info, qtype]
            k, kq, v, vq = halves
            if k_name.replace("k_b_proj", "kv_b_proj") in self._info:
                continue  # the file also keeps kv_b whole (ik_llama.cpp's GGUFs): that one is read
            heads, lora = k.shape[0], k.shape[1]
            nope = k.shape[2] if kq is None else k.shape[2] // block_geometry(kq)[1] * block_geometry(kq)[0]
            shape = (heads * (nope + v.shape[1]), lora)
            dtype = k.dtype if kq is None and vq is None and k.dtype == v.dtype else "F32"
            name = k_name.replace("k_b_proj", "kv_b_proj")
            self._info[name] = TensorInfo(dtype, shape, k.file, nbytes_of(dtype, shape), k.offset)
            self._mla[name] = (k, kq, v, vq)

    def _half(self, key: str, info: TensorInfo, qtype: Any) -> torch.Tensor:
        t = self._pread(key, info, info.offset, info.nbytes, info.shape)
        return t.float() if qtype is None else GgmlCodec(qtype).decode({"weight": t}, key)

    def read(self, key: str) -> torch.Tensor:
        qtype = self._markers.get(key)
        if qtype is not None:
            return marker(qtype)
        mla = self._mla.get(key)
        if mla is not None:
            k, kq, v, vq = mla
            merged = merge_kv_b(self._half(key, k, kq), self._half(key, v, vq))
            return merged.to(torch_dtype_of(self._info[key].dtype))
        tensor = super().read(key)
        rows = self._permute.get(key)
        return tensor.index_select(0, rows) if rows is not None else tensor

    def read_item(self, key: str, index: int) -> torch.Tensor:
        return self.read(key)[index]  # only 2-D and 1-D tensors are presented: never a stack


def open_gguf(path: Path) -> GgufCheckpoint:
    """Open a .gguf file, the first (or any) file of a split set, or a folder holding them."""
    files = _gguf_files(path)
    identities = {f: FileIdentity.of(f) for f in files}
    return GgufCheckpoint(files[0].parent, files, identities)


def _gguf_files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        stems = {m["stem"] if (m := SPLIT.match(f.name)) else f.stem for f in found}
        if len(stems) != 1:
            raise MoeportError(
                f"{path}: holds more than one GGUF model ({', '.join(sorted(stems))}); name the file"
            )
        path = found[0]
    m = SPLIT.match(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    files = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MoeportError(f"{path}: split set lacks {', '.join(missing)}")
    return files


def _reader(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise MoeportError(f"{path}: not a readable GGUF file ({exc})") from None


def _fields(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or (key.startswith("tokenizer.ggml.") and field.types[0].name == "ARRAY"):
            continue  # the header's own counts; the vocabulary arrays (not config)
        try:
            out[key] = field.contents()
        except (ValueError, IndexError):
            continue
    return out


def _check_split(files: list[Path], readers: list[Any]) -> None:
    if len(files) == 1:
        return
    for i, (f, r) in enumerate(zip(files, readers, strict=True)):
        no = r.fields.get("split.no")
        if no is None or int(no.contents()) != i:
            raise MoeportError(f"{f}: expected split.no {i} of a {len(files)}-file set")


def gguf_config(arch: GgufArch, kv: dict[str, Any], info: dict[str, TensorInfo]) -> dict[str, Any]:
    """config.json of the family, from the GGUF keys and the tensors' shapes."""
    a = arch.arch
    cfg: dict[str, Any] = {"model_type": arch.model_type, "architectures": [arch.architectures]}
    for field, key in arch.hparams:
        value = kv.get(f"{a}.{key}")
        if value is not None and field not in cfg:
            cfg[field] = value
    experts = kv.get(f"{a}.expert_count")
    if experts is None:
        raise MoeportError(f"GGUF '{a}' model without '{a}.expert_count': not a mixture of experts")
    cfg[arch.experts_field] = experts
    if "rope_theta" in cfg:
        cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}
    embed = info.get("model.embed_tokens.weight")
    if embed is not None:
        cfg["vocab_size"] = embed.shape[0]
    cfg["tie_word_embeddings"] = "lm_head.weight" not in info
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if (value := kv.get(f"tokenizer.ggml.{key}")) is not None:
            cfg[field] = value
    if arch.derive_config is not None:
        short = {k.removeprefix(f"{a}."): v for k, v in kv.items() if k.startswith(f"{a}.")}
        try:
            derived = arch.derive_config(short)
        except KeyError as exc:
            raise MoeportError(f"GGUF '{a}' model without '{a}.{exc.args[0]}'") from None
        if "rope_scaling" in derived:  # transformers 5 keeps it with the theta
            cfg.setdefault("rope_parameters", {}).update(derived.pop("rope_scaling"))
        cfg.update(derived)
    for field, value in arch.config_defaults:
        cfg.setdefault(field, value)
    return json.loads(json.dumps(cfg))  # plain JSON types (numpy scalars from the reader)
