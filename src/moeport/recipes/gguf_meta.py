"""The metadata keys of a GGUF moeport writes: hyper-parameters, file type, tokenizer, provenance.

Keys are collected through gguf-py's own `GGUFWriter.add_*` methods and vocabulary classes
(`gguf.vocab`: BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab), so names and value
types are the ones llama.cpp reads. The writer here only collects (it never opens a file); the
sink (sinks/gguf.py) writes the collected keys. A source without tokenizer files gets the `none`
model plus `{arch}.vocab_size`, as llama.cpp's converter writes it and llama.cpp loads (tokens then
go in as ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.sources.checkpoint import Checkpoint
from moeport.sources.gguf import MOEPORT_KEY
from moeport.zoo.gguf_arch import GgufArch
from moeport.zoo.model_config import ModelConfig

# gguf LlamaFileType per --gguf-type (general.file_type)
_FILE_TYPES = {"bf16": "MOSTLY_BF16", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
_FILE_TYPES["mxfp4"] = "MOSTLY_MXFP4_MOE"
# tokenizer.ggml.pre of a BPE vocabulary per arch (convert_hf_to_gguf.py's hash table names them)
_PRE = {"qwen3moe": "qwen2", "qwen2moe": "qwen2"}


def file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    return int(LlamaFileType[_FILE_TYPES[gguf_type]])


def model_keys(
    ck: Checkpoint, det: Detection, arch: GgufArch, ftype: int, metadata: dict[str, str]
) -> list[tuple[str, Any, Any]]:
    """(key, value, GGUFValueType) of the model, in the order llama.cpp's converter writes them."""
    from gguf import GGUFWriter

    w = GGUFWriter(None, arch.arch)  # a collector: kv_data only, no file
    w.add_name(ck.root.resolve().name)
    w.add_file_type(ftype)
    w.add_quantization_version(2)
    cfg = ModelConfig(ck.config or {})
    a = arch.arch
    done: set[str] = set()
    for field, key in arch.hparams:
        value = cfg.first((field,))
        if value is None and field == "rope_theta":
            value = (cfg.first(("rope_parameters",)) or {}).get("rope_theta")
        if value is None or key in done:
            continue
        done.add(key)
        w.add_key_value(f"{a}.{key}", value, _vtype(field, value))
    if arch.derive_keys is not None:
        for key, value in arch.derive_keys({**cfg.raw, **cfg.text}).items():
            w.add_key_value(f"{a}.{key}", value, _vtype(key, value))
    w.add_expert_count(det.experts_per_layer)
    vocab = _vocab(ck.root, w, arch)
    if vocab is None:
        embed = next((ck.info(k).shape[0] for k in ck.keys() if k.endswith("embed_tokens.weight")), None)
        if embed is not None:
            w.add_vocab_size(embed)
    if "moeport" in metadata:
        w.add_string(MOEPORT_KEY, metadata["moeport"])
    return [(k, v.value, v.type) for k, v in w.kv_data[0].items() if k != "general.architecture"]


def _vtype(field: str, value: Any) -> Any:
    """The GGUF value type llama.cpp's converter gives a hyper-parameter of this Python type."""
    from gguf import GGUFValueType

    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    raise MoeportError(f"config.json: '{field}' is {value!r}, expected a number")


def _vocab(root: Path, w: Any, arch: GgufArch) -> Any:
    """Tokenizer keys from the source folder's tokenizer files (None: the source has none)."""
    from gguf import vocab as gv

    found = None
    for kind in (gv.BpeVocab, gv.LlamaHfVocab):
        try:
            found = kind(root)
            break
        except (FileNotFoundError, TypeError, ImportError, KeyError):
            continue
    if found is None and (root / "tokenizer.model").is_file():
        try:
            found = gv.SentencePieceVocab(root)
        except RuntimeError as exc:  # sentencepiece missing: say so rather than drop the vocabulary
            raise MoeportError(f"{root / 'tokenizer.model'}: {exc} (pip install sentencepiece)") from None
    if found is None:
        w.add_tokenizer_model("none")  # llama.cpp's converter (`_set_vocab_none`); it reads vocab_size
        return None
    tokens, scores, types = [], [], []
    for text, score, kind in found.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    w.add_tokenizer_model(found.tokenizer_model)
    if found.tokenizer_model == "gpt2" and arch.arch in _PRE:
        w.add_tokenizer_pre(_PRE[arch.arch])
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gv.SpecialVocab(root, load_merges=found.tokenizer_model == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)
    return found
