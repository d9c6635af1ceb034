"""Bytes of HLO shapes as XLA prints them: 'bf16[8,16]{1,0}', '(f32[8]{0}, u32[])'."""

from __future__ import annotations

import math
import re

_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)"
                    r"\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def array_bytes(shape_text: str) -> list[float]:
  """The logical bytes of each array in `shape_text`, in order (a scalar `u32[]`: 4)."""
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    sizes.append(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
  return sizes


def value_bytes(shape_text: str, index: str) -> tuple[float, str]:
  """('f32[8,4]{1,0}' or a tuple shape, '{}' or '{1}') -> (logical bytes, 'f32[8,4]'):
  the value at `index` of an instruction's result, as XLA's live ranges name it."""
  arrays = re.findall(r"\b(\w+)\[([\d,]*)\]", shape_text)  # every element, in order
  if shape_text.lstrip().startswith("("):
    if index == "{}":
      return 0, ""  # the tuple itself holds pointers only
    position = int(index.strip("{}").split(",")[0])
    arrays = arrays[position:position + 1]
  text = " ".join(f"{dtype}[{dims}]" for dtype, dims in arrays)
  return sum(array_bytes(text)), text
