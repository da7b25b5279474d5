"""``retrofit export``: a retrofitted model as ONNX or a ``torch.export`` program, checked before it is written.

An export is only reported when the exported model, run by the runtime that will run it (onnxruntime
for ONNX, ``torch.export.load`` for an ExportedProgram), gives the model's own eval-mode outputs on probe
inputs within :func:`tolerance`, at the batch size it was traced with and at another one (the batch
dimension is dynamic). Otherwise nothing is written.

ONNX goes through PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset
:data:`OPSET`), which needs no ``onnxscript``; the check needs ``onnxruntime`` (``pip install
'retrofit[export]'``).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RetrofitError

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = ("onnx", "exported-program")
#: The ONNX opset written (onnxruntime ≥ 1.12 runs it).
OPSET = 17
#: Relative tolerance of the check: outputs may differ by RTOL × max(1, max |output|).
RTOL = 1e-4
#: The batch size traced with, and another one that proves the batch dimension dynamic.
TRACE_BATCH, CHECK_BATCH = 2, 3
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class ExportResult:
    """What was written and how it was checked.

    ``input_shape``: ``["batch", C, H, W]``; ``checked_batches``: the batch sizes run through the exported
    model; ``max_abs_diff``: the largest |exported − model| over them; ``tolerance``: the bound it met;
    ``runtime``: what ran the export (``onnxruntime 1.x``, ``torch.export.load``).
    """

    output: str
    format: str
    bytes: int
    input_name: str
    output_name: str
    input_shape: list[Any]
    checked_batches: list[int]
    max_abs_diff: float
    tolerance: float
    runtime: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tolerance(reference: "torch.Tensor") -> float:
    """``RTOL × max(1, max |reference|)``: absolute for small logits, relative for large ones."""
    return RTOL * max(1.0, float(reference.abs().max()))


def check_format(fmt: str) -> str:
    """``fmt`` when it is one of :data:`FORMATS`; else :class:`RetrofitError` (no torch needed)."""
    if fmt not in FORMATS:
        raise RetrofitError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            raise RetrofitError("--format onnx checks the export with onnxruntime, which is not installed: "
                                "pip install 'retrofit[export]'")
    return fmt


def model_input_size(model: "nn.Module") -> tuple[int, int, int]:
    """``(C, H, W)`` a model takes: the size a fine-tuning run trained it at (its recorded data config),
    else the size its sites were found with, else its ``pretrained_cfg`` size (or 3×224×224)."""
    from .probe import default_input_size
    from .surgery import MODEL_MARK

    trained = (getattr(model, "retrofit_data_config", None) or {}).get("input_size")
    if trained:
        return tuple(int(v) for v in trained)  # type: ignore[return-value]
    record = getattr(model, MODEL_MARK, None)
    if record is not None and record.input_size:
        return tuple(int(v) for v in record.input_size)  # type: ignore[return-value]
    return default_input_size(model)


def export(
    model: "nn.Module",
    path: str | os.PathLike,
    *,
    format: str,
    input_size: tuple[int, int, int] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``model`` (eval mode, CPU, float32) to ``path``, check it, then write it atomically.

    Args:
        model: any image classifier whose forward maps ``(N, C, H, W)`` to one ``(N, classes)`` tensor
            (a retrofitted model, or one rebuilt by :func:`retrofit.load_checkpoint`).
        path: the output file (``.onnx`` / ``.pt2`` by convention).
        format: ``onnx`` or ``exported-program`` (``torch.export.save``).
        input_size: ``(C, H, W)``; default :func:`model_input_size`.
        overwrite: replace an existing ``path``.

    Returns: :class:`ExportResult`. Raises :class:`RetrofitError` (nothing written): an unknown format,
    onnxruntime missing for ONNX, an output that exists (without ``overwrite``), a model whose output is
    not one tensor, an export that fails, or outputs that differ by more than :func:`tolerance`.
    """
    import torch

    from .checkpoint import atomic_write_bytes, check_writable

    check_format(format)
    path = check_writable(path, overwrite)
    size = tuple(input_size) if input_size is not None else model_input_size(model)
    model = model.eval().to("cpu", torch.float32)
    generator = torch.Generator().manual_seed(0)
    probes = [torch.randn(n, *size, generator=generator) for n in (TRACE_BATCH, CHECK_BATCH)]
    with torch.no_grad():
        references = [model(x) for x in probes]
    if not isinstance(references[0], torch.Tensor):
        raise RetrofitError(f"export takes a model whose forward returns one tensor (a classifier); "
                            f"{type(model).__name__} returns {type(references[0]).__name__}")
    try:
        if format == "onnx":
            data = _onnx_bytes(model, probes[0])
            outputs, runtime = _run_onnx(data, probes)
        else:
            data = _program_bytes(model, probes[0])
            outputs, runtime = _run_program(data, probes)
    except RetrofitError:
        raise
    except Exception as e:  # the exporters and runtimes raise many types
        text = str(e).strip().splitlines()
        raise RetrofitError(f"{format} export of {type(model).__name__} failed: {type(e).__name__}: "
                            f"{text[0] if text else ''}") from None
    diff, bound = 0.0, 0.0
    for got, want in zip(outputs, references):
        if tuple(got.shape) != tuple(want.shape):
            raise RetrofitError(f"the exported model returned shape {tuple(got.shape)} for a batch of {want.shape[0]}, "
                                f"the model {tuple(want.shape)}; nothing written")
        diff = max(diff, float((got.float() - want.float()).abs().max()))
        bound = max(bound, tolerance(want))
    if not diff <= bound:  # also catches NaN
        raise RetrofitError(f"the {format} export's outputs differ from the model's by {diff:.3g} (tolerance "
                            f"{bound:.3g} = {RTOL:g} × max(1, max |output|)); nothing written")
    atomic_write_bytes(path, data, overwrite=overwrite)
    return ExportResult(str(path), format, len(data), INPUT_NAME, OUTPUT_NAME, ["batch", *size],
                        [int(x.shape[0]) for x in probes], diff, bound, runtime)


def _onnx_bytes(model: "nn.Module", example: "torch.Tensor") -> bytes:
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices: known, and not the user's
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return buffer.getvalue()


def _run_onnx(data: bytes, probes: list["torch.Tensor"]) -> tuple[list["torch.Tensor"], str]:
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = [torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]) for x in probes]
    return outputs, f"onnxruntime {onnxruntime.__version__}"


def _program_bytes(model: "nn.Module", example: "torch.Tensor") -> bytes:
    import torch
    from torch.export import Dim

    program = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _run_program(data: bytes, probes: list["torch.Tensor"]) -> tuple[list["torch.Tensor"], str]:
    import torch

    module = torch.export.load(io.BytesIO(data)).module()
    with torch.no_grad():
        outputs = [module(x) for x in probes]
    return outputs, "torch.export.load"


def export_target(target: str, output: str | os.PathLike, *, format: str, weights: str | None = None,
                  input_size: tuple[int, int, int] | None = None, overwrite: bool = False) -> ExportResult:
    """``retrofit export``: load a checkpoint (an adapter with its base ``weights``) or a model name, then
    :func:`export` it under the output's lock. Raises :class:`RetrofitError` as those do."""
    from .checkpoint import check_writable, load_target
    from .lock import output_lock

    check_format(format)
    output = check_writable(output, overwrite)
    for given, what in ((target, "CHECKPOINT"), (weights, "--weights")):
        if given is not None and output.exists() and output.resolve() == Path(given).resolve():
            raise RetrofitError(f"output {output} is the {what} file itself; write to another file")
    with output_lock(output, "-o"):
        model = load_target(target, weights=weights)
        return export(model, output, format=format, input_size=input_size, overwrite=overwrite)
