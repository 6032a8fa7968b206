"""Writes the `torch-bin` target's seeds made by the reference torch itself: small state dicts
saved with `torch.save`, covering what real pytorch_model.bin files hold (every storage dtype
the reader accepts, parameters, shared storages, views with offsets and strides, empty and
scalar tensors, OrderedDict metadata, both pickle protocols torch uses).

usage: .venv/bin/python crates/vh-fuzz/make_torch_seeds.py crates/vh-fuzz/corpus/torch-bin
"""

import collections
import os
import sys

import torch

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)


def save(name, obj, **kwargs):
    torch.save(obj, os.path.join(out, f"torch-{name}.bin"), **kwargs)


save("float", {"w": torch.randn(2, 3), "b": torch.zeros(3)})
save(
    "dtypes",
    {
        "f16": torch.randn(3).half(),
        "bf16": torch.randn(3).bfloat16(),
        "f64": torch.randn(2).double(),
        "i64": torch.arange(4),
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(2, dtype=torch.int16),
        "i8": torch.arange(2, dtype=torch.int8),
        "u8": torch.arange(2, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
    },
)
base = torch.randn(4, 4)
save("shared-views", {"whole": base, "row": base[1], "col": base[:, 2], "t": base.t()})
save("empty-and-scalar", {"empty": torch.zeros(0, 3), "scalar": torch.tensor(1.5), "one": torch.ones(1)})
sd = torch.nn.Linear(3, 2).state_dict()
save("ordered-dict-metadata", sd)
save("parameters", collections.OrderedDict(p=torch.nn.Parameter(torch.randn(2))))
save("protocol4", {"w": torch.randn(2, 2)}, pickle_protocol=4)
save("tied", {"wte.weight": base, "lm_head.weight": base})
print(f"wrote torch.save seeds to {out}")
