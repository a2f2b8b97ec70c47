"""The one table of dtypes: how each is spelled in --dtype, in a safetensors header, in a
torch.save pickle (its storage class) and in inspect's table. Every other module derives its
mapping from here, so a dtype added here is known everywhere at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dtype:
    dtype: torch.dtype
    short: str | None  # inspect's column (None: torch's own name)
    safetensors: str | None = None  # the header's "dtype", when safetensors can hold it
    storages: tuple[str, ...] = ()  # torch.save's storage classes that carry it (the first is written)
    options: tuple[str, ...] = ()  # spellings --dtype and --accum-dtype take (the first is canonical)


TABLE: tuple[Dtype, ...] = (
    Dtype(torch.float64, "f64", "F64", ("DoubleStorage",), ("float64", "fp64", "double")),
    Dtype(torch.float32, "f32", "F32", ("FloatStorage",), ("float32", "fp32", "float")),
    Dtype(torch.float16, "f16", "F16", ("HalfStorage",), ("float16", "fp16", "half")),
    Dtype(torch.bfloat16, "bf16", "BF16", ("BFloat16Storage",), ("bfloat16", "bf16")),
    Dtype(torch.int64, "i64", "I64", ("LongStorage",)),
    Dtype(torch.int32, "i32", "I32", ("IntStorage",)),
    Dtype(torch.int16, "i16", "I16", ("ShortStorage",)),
    Dtype(torch.int8, "i8", "I8", ("CharStorage",)),
    Dtype(torch.uint8, "u8", "U8", ("ByteStorage", "UntypedStorage")),
    Dtype(torch.bool, "bool", "BOOL", ("BoolStorage",)),
    Dtype(torch.uint16, None, "U16"),
    Dtype(torch.uint32, None, "U32"),
    Dtype(torch.uint64, None, "U64"),
    Dtype(torch.float8_e4m3fn, None, "F8_E4M3"),
    Dtype(torch.float8_e5m2, None, "F8_E5M2"),
    Dtype(torch.complex64, None, "C64", ("ComplexFloatStorage",)),
    Dtype(torch.complex128, None, None, ("ComplexDoubleStorage",)),
    Dtype(torch.qint8, None, None, ("QInt8Storage",)),
    Dtype(torch.quint8, None, None, ("QUInt8Storage",)),
    Dtype(torch.qint32, None, None, ("QInt32Storage",)),
)

# The dtypes an output may be cast to, in the order --help and the errors list them.
OUTPUT_CHOICES = ("float32", "bfloat16", "float16", "float64")
ACCUMULATOR_CHOICES = ("float64", "float32")

BY_OPTION: dict[str, torch.dtype] = {name: row.dtype for row in TABLE for name in row.options}
BY_SAFETENSORS: dict[str, torch.dtype] = {row.safetensors: row.dtype for row in TABLE if row.safetensors}
SAFETENSORS_NAME: dict[torch.dtype, str] = {dtype: name for name, dtype in BY_SAFETENSORS.items()}
BY_STORAGE: dict[str, torch.dtype] = {name: row.dtype for row in TABLE for name in row.storages}
STORAGE_NAME: dict[torch.dtype, str] = {row.dtype: row.storages[0] for row in TABLE if row.storages}
SHORT_NAME: dict[torch.dtype, str] = {row.dtype: row.short for row in TABLE if row.short}


def short_name(dtype: torch.dtype) -> str:
    """inspect's short name (f32, bf16, i64), or torch's own for a dtype the table lacks."""
    return SHORT_NAME.get(dtype, full_name(dtype))


def full_name(dtype: torch.dtype) -> str:
    """torch's name without the module: float32, bfloat16 (what provenance records)."""
    return str(dtype).removeprefix("torch.")
