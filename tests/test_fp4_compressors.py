"""compressed-tensors' own NVFP4/MXFP4 compressors give our bytes from our weights and scales (and
decompress them to our decode), run in a fresh interpreter: see the test's docstring."""

from __future__ import annotations

import subprocess
import sys

import torch
from test_convert_fp4 import raw, weights

from moeport.codecs import CtMxfp4Codec, CtNvfp4Codec

CT_CHILD = r"""
import sys, torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
out = []
for preset, fmt, sd in torch.load(sys.argv[1]):
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if sd["weight_scale"].dtype == torch.uint8:  # E8M0 bytes: 2^-127 is subnormal, made here
        sd["weight_scale"] = torch.ldexp(torch.ones(sd["weight_scale"].shape), sd["weight_scale"].int() - 127)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    theirs = compressor.compress(sd, scheme)
    out.append((theirs, compressor.decompress(dict(theirs), scheme)["weight"]))
torch.save(out, sys.argv[2])
"""


def test_compressed_tensors_compressors_give_our_bytes(tmp_path) -> None:
    """In a fresh interpreter: kt-kernel's import (another test) sets flush-to-zero on this process's
    main thread, under which compressed-tensors' own MXFP4 encode of an all-zero group goes wrong
    (2^-127 scales flush to 0, and 0 / 0 codes are NaN); ours gives the same bytes either way
    (fp4.mx_encode)."""
    cases, ours_all = [], []
    for preset, codec in (("NVFP4A16", CtNvfp4Codec()), ("MXFP4A16", CtMxfp4Codec())):
        fmt = "nvfp4-pack-quantized" if preset == "NVFP4A16" else "mxfp4-pack-quantized"
        for seed in range(3):
            w = weights(seed)
            ours = codec.encode(w)
            sd = {"weight": w}
            if preset == "NVFP4A16":
                sd |= {
                    "weight_scale": ours["weight_scale"].float(),
                    "weight_global_scale": ours["weight_global_scale"],
                }
            else:
                sd["weight_scale"] = ours["weight_scale"]
            cases.append((preset, fmt, sd))
            ours_all.append((preset, codec, ours))
    torch.save(cases, tmp_path / "in.pt")
    r = subprocess.run(
        [sys.executable, "-c", CT_CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for (preset, codec, ours), (theirs, back) in zip(ours_all, torch.load(tmp_path / "out.pt"), strict=True):
        for part in ours:
            assert torch.equal(raw(theirs[part]), raw(ours[part])), (preset, part)
        assert torch.equal(back.float(), codec.decode(ours).to(back.dtype).float()), preset
