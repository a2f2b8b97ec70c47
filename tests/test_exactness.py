"""Exactness: every element is the float64 mean rounded once into the output dtype (SPEC 1.5).

A property test over shapes, dtypes, checkpoint counts and weights compares the Python API's
output with the oracle bit for bit, and targeted tests use means that sit where rounding
float64 -> float32 -> bfloat16/float16 (torch's own conversion) gives the wrong answer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from conftest import oracle_mean, round_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ckpt_avg import average_checkpoints

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
OUT_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[dict[str, torch.Tensor]], list[float] | None, torch.dtype | None]:
    count = draw(st.integers(1, 6))
    specs = []
    for index in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))  # () is a scalar; all-empty dicts look like ZeRO-3
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        specs.append((f"t{index}.weight", shape, dtype))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 2.0 ** draw(st.integers(-12, 8))
    generator = torch.Generator().manual_seed(seed)
    shared = draw(st.booleans())  # small perturbations of one tensor: many near-ties
    checkpoints = []
    for _ in range(count):
        sd = {}
        for name, shape, dtype in specs:
            base = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            noise = torch.randn(shape, generator=generator, dtype=torch.float64)
            values = base + noise * 2.0**-10 if shared else noise
            sd[name] = (values * scale).to(dtype)
        checkpoints.append(sd)
    weights = None
    if draw(st.booleans()):
        weights = draw(st.lists(st.sampled_from([0.0, 0.1, 0.25, 1.0, 1.5, 3.0, 7.0]) | st.floats(0.01, 10.0),
                                min_size=count, max_size=count).filter(lambda w: sum(w) > 0))  # fmt: skip
    out_dtype = draw(st.none() | st.sampled_from(list(DTYPES.values())))
    return checkpoints, weights, out_dtype


def average_via_api(
    checkpoints: list[dict[str, torch.Tensor]], directory: Path, **choices: object
) -> dict[str, torch.Tensor]:
    inputs = []
    for epoch, sd in enumerate(checkpoints):
        path = directory / f"epoch={epoch}.safetensors"
        save_file(sd, path)
        inputs.append(str(path))
    output = directory / "avg.safetensors"
    average_checkpoints(inputs, str(output), **choices)
    return load_file(output)


@settings(max_examples=40, deadline=None, database=None)
@given(problems())
def test_average_equals_the_float64_oracle(
    problem: tuple[list[dict[str, torch.Tensor]], list[float] | None, torch.dtype | None],
) -> None:
    checkpoints, weights, out_dtype = problem
    choices: dict[str, object] = {}
    if weights is not None:
        choices["weights"] = tuple(weights)
    if out_dtype is not None:
        choices["dtype"] = OUT_DTYPES[out_dtype]
    with tempfile.TemporaryDirectory() as directory:
        averaged = average_via_api(checkpoints, Path(directory), **choices)
    # Equal weights are the plain mean, computed as sum / n (the more exact of the two forms).
    oracle_weights = None if weights is None or len(set(weights)) == 1 else weights
    for name in checkpoints[0]:
        # Flattened: conftest's bfloat16 reference works on arrays, not 0-d scalars.
        flat = [sd[name].reshape(-1) for sd in checkpoints]
        expected = oracle_mean(flat, oracle_weights, out_dtype).reshape(checkpoints[-1][name].shape)
        got = averaged[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected), f"{name}: {got} != {expected}"


# ---------------------------------------------------------------- rounding once, at the midpoints


def _near_midpoints(dtype: torch.dtype, count: int = 512) -> torch.Tensor:
    """float64 values a hair beyond a midpoint of `dtype`, too close for float32 to see.

    Rounding to float32 first lands exactly on the midpoint, and ties-to-even then picks the
    wrong neighbour; a single rounding does not.
    """
    mantissa = 7 if dtype == torch.bfloat16 else 10
    generator = torch.Generator().manual_seed(7)
    significand = torch.randint(0, 2**mantissa, (count,), generator=generator, dtype=torch.int64)
    exponent = torch.randint(-8, 8, (count,), generator=generator, dtype=torch.int64).to(torch.float64)
    sign = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
    ulp = 2.0**-mantissa
    base = 1.0 + significand.to(torch.float64) * ulp  # exactly representable in dtype
    odd = (significand % 2) == 1
    # Even base: just above the midpoint (round up); odd base: just below it (round down).
    nudge = torch.where(odd, -(2.0**-40), 2.0**-40)
    return sign * (base + ulp / 2 + nudge) * 2.0**exponent


def test_float64_means_at_midpoints_round_once() -> None:
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        target = _near_midpoints(dtype)
        double_rounded = target.to(torch.float32).to(dtype)
        once = round_reference(target, dtype)
        assert not torch.equal(double_rounded, once)
        assert (double_rounded != once).all(), "every element must be a case torch's conversion gets wrong"
        # Three float64 checkpoints whose mean is exactly `target`.
        _, exponent = torch.frexp(target)
        delta = torch.ldexp(torch.ones_like(target), exponent - 12)  # keeps every sum exact
        checkpoints = [{"w": target - delta}, {"w": target.clone()}, {"w": target + delta}]
        assert torch.equal((checkpoints[0]["w"] + checkpoints[1]["w"] + checkpoints[2]["w"]) / 3, target)
        with tempfile.TemporaryDirectory() as directory:
            averaged = average_via_api(checkpoints, Path(directory), dtype=name)
        assert torch.equal(averaged["w"], once), f"{name}: ckpt-avg rounded twice"


def _float64_mean(tensors: list[torch.Tensor], weights: list[float] | None) -> torch.Tensor:
    """The unrounded float64 mean, accumulated as the oracle does."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64)
    if weights is None:
        for t in tensors:
            total += t.double()
        return total / len(tensors)
    for w, t in zip(weights, tensors, strict=True):
        total += t.double() * (w / sum(weights))
    return total


def _double_rounding_cases(
    source: torch.dtype, target: torch.dtype, weights: list[float] | None, samples: int = 1 << 21
) -> list[torch.Tensor]:
    """Three `source` tensors whose float64 mean torch's two-step conversion to `target` rounds wrongly."""
    generator = torch.Generator().manual_seed(1234)
    tensors = [torch.randn(samples, generator=generator).to(source) for _ in range(3)]
    mean = _float64_mean(tensors, weights)
    wrong = mean.to(torch.float32).to(target) != round_reference(mean, target)
    assert int(wrong.sum()) >= 5, "the search should find a handful of double-rounding cases"
    keep = torch.cat([wrong.nonzero().flatten()[:4096], torch.arange(64)])  # and ordinary elements beside them
    return [t[keep].clone() for t in tensors]


CASES = [
    # float32 checkpoints written as bfloat16/float16 (--dtype): about one element in 2^17 (SPEC 1.5)
    (torch.float32, torch.bfloat16, None),
    (torch.float32, torch.float16, None),
    # low-precision checkpoints under --weights: the weights add bits below float32's reach
    (torch.bfloat16, torch.bfloat16, [1.0, 2.0, 4.0]),
    (torch.float16, torch.float16, [1.0, 2.0, 4.0]),
]


def test_means_that_double_rounding_gets_wrong(tmp_path: Path) -> None:
    for number, (source, target, weights) in enumerate(CASES):
        tensors = _double_rounding_cases(source, target, weights)
        expected = oracle_mean(tensors, weights, target)
        naive = _float64_mean(tensors, weights).to(target)  # torch: via float32, rounding twice
        assert not torch.equal(naive, expected)
        choices: dict[str, object] = {"dtype": OUT_DTYPES[target]}
        if weights is not None:
            choices["weights"] = tuple(weights)
        directory = tmp_path / str(number)
        directory.mkdir()
        averaged = average_via_api([{"w": t} for t in tensors], directory, **choices)
        assert averaged["w"].dtype == target
        assert torch.equal(averaged["w"], expected), f"{source} -> {target}: rounded twice"
        # The same through a .pt output.
        inputs = [str(directory / f"epoch={i}.safetensors") for i in range(3)]
        average_checkpoints(inputs, str(directory / "avg.pt"), **choices)
        assert torch.equal(torch.load(directory / "avg.pt", weights_only=True)["w"], expected)
