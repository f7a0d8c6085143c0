"""What a model takes: an ordered list of named inputs (an image tensor, or token ids with their masks).

The spec is the one place that knows how to make example inputs (torch tensors, for pruning, MACs and export),
ONNX Runtime feeds (numpy, for every latency backend, the isolated worker and the remote agent) and how the
model is called (positional or keyword). The default spec is one float image named ``input``: every path behaves
exactly as it did before specs existed.

Text form (``--inputs``, study storage): comma-separated ``NAME:DTYPE[:DIMS[:HIGH]]``, e.g.
``input_ids:int64:128,attention_mask:int64:128`` or ``input:float32:3x224x224``. DIMS are ``x``-separated sizes
of one sample (no batch); an int64 input without DIMS has one dimension, the sequence length, taken from the
device profile (``sequence_length``). HIGH bounds token ids (the vocabulary size). A trailing ``,call=keyword``
calls the model as ``model(**inputs)`` instead of ``model(*inputs)``; ``,padding=0.25`` masks out the last quarter
of every sequence in ``attention_mask`` (all ones otherwise).

Imports no torch at module level: the latency worker and the agent use it with numpy alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

DTYPES = ("float32", "int64")
CALLS = ("positional", "keyword")
DEFAULT_SEQUENCE_LENGTH = 128
IMAGE_INPUT_NAME = "input"
TEXT_FORM = "NAME:DTYPE[:DIMS[:HIGH]] joined by commas, e.g. input_ids:int64:128,attention_mask:int64:128"

# How token-side inputs are filled: a mask of ones (every position attended), segment ids of zeros.
_ONES = ("attention_mask",)
_ZEROS = ("token_type_ids",)


@dataclass(frozen=True)
class InputField:
    """One named input. ``shape`` is one sample (no batch); ``None`` in it stands for the sequence length."""

    name: str
    dtype: str = "float32"
    shape: Tuple[Optional[int], ...] = ()
    high: Optional[int] = None  # int64 ids are drawn from [0, high); None: zeros (or ones for a mask)

    def sample_shape(self, sequence_length: Optional[int]) -> Tuple[int, ...]:
        return tuple(int(sequence_length or DEFAULT_SEQUENCE_LENGTH) if d is None else int(d) for d in self.shape)

    @property
    def fill(self) -> str:
        """normal (float), ids (token ids in [0, high)), ones (attention mask) or zeros (segment ids, others)."""
        if self.dtype == "float32":
            return "normal"
        if self.name in _ONES:
            return "ones"
        if self.name in _ZEROS or not self.high:
            return "zeros"
        return "ids"

    def to_text(self) -> str:
        dims = "x".join("" if d is None else str(d) for d in self.shape) if None not in self.shape else ""
        text = f"{self.name}:{self.dtype}"
        if dims or self.high:
            text += f":{dims}"
        if self.high:
            text += f":{self.high}"
        return text


@dataclass(frozen=True)
class InputSpec:
    """An ordered list of inputs, how the model is called with them, and (optionally) a fixed sequence length."""

    fields: Tuple[InputField, ...]
    call: str = "positional"
    sequence_length: Optional[int] = None  # None: the profile's (DEFAULT_SEQUENCE_LENGTH where there is none)
    padding: float = 0.0  # fraction of each sequence's last positions the attention mask leaves out

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def image(cls, shape: Sequence[int]) -> "InputSpec":
        """The default: one float tensor named ``input`` of one sample's ``shape`` (C, H, W)."""
        return cls((InputField(IMAGE_INPUT_NAME, "float32", tuple(int(d) for d in shape)),))

    @classmethod
    def tokens(cls, names: Sequence[str], vocab_size: Optional[int],
               sequence_length: Optional[int] = None) -> "InputSpec":
        """Token inputs (``input_ids``, ``attention_mask``, ...) of one sequence-length dimension each."""
        fields = tuple(InputField(n, "int64", (None,), vocab_size if n == "input_ids" else None) for n in names)
        return cls(fields, sequence_length=sequence_length)

    @classmethod
    def parse(cls, text: str) -> "InputSpec":
        """The spec a ``--inputs`` text names; a text that does not parse is one ModelError line."""
        from hwprune.errors import ModelError

        def bad(why: str) -> ModelError:
            return ModelError(f"--inputs {text!r} is not valid: {why}; write {TEXT_FORM}")

        call, padding = "positional", 0.0
        fields = []
        for part in [p.strip() for p in str(text).split(",") if p.strip()]:
            if part.startswith("call="):
                call = part.split("=", 1)[1]
                if call not in CALLS:
                    raise bad(f"call {call!r} is not one of {', '.join(CALLS)}")
                continue
            if part.startswith("padding="):
                try:
                    padding = float(part.split("=", 1)[1])
                except ValueError:
                    padding = -1.0
                if not 0.0 <= padding < 1.0:
                    raise bad(f"{part!r}: padding is the fraction of positions masked out, in [0, 1)")
                continue
            bits = part.split(":")
            if len(bits) < 2 or len(bits) > 4 or not bits[0].isidentifier():
                raise bad(f"{part!r} is not NAME:DTYPE[:DIMS[:HIGH]]")
            name, dtype = bits[0], bits[1]
            if dtype not in DTYPES:
                raise bad(f"dtype {dtype!r} of {name!r} is not one of {', '.join(DTYPES)}")
            dims_text = bits[2] if len(bits) > 2 else ""
            try:
                shape: Tuple[Optional[int], ...] = tuple(int(d) for d in dims_text.split("x")) if dims_text else ()
                high = int(bits[3]) if len(bits) > 3 else None
            except ValueError:
                raise bad(f"sizes in {part!r} are not integers") from None
            if any(d <= 0 for d in shape) or (high is not None and high <= 0):
                raise bad(f"sizes in {part!r} must be positive")
            if not shape:
                if dtype != "int64":
                    raise bad(f"float input {name!r} needs its sizes, e.g. {name}:float32:3x224x224")
                shape = (None,)  # the profile's sequence length
            if high is not None and dtype != "int64":
                raise bad(f"a value range (HIGH) applies to int64 token inputs, not to {name!r}")
            fields.append(InputField(name, dtype, shape, high))
        if not fields:
            raise bad("it names no input")
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise bad(f"input names repeat ({', '.join(names)})")
        return cls(tuple(fields), call, padding=padding)

    def to_text(self) -> str:
        text = ",".join(f.to_text() for f in self.fields)
        text += f",call={self.call}" if self.call != "positional" else ""
        return text + (f",padding={self.padding:g}" if self.padding else "")

    def to_dict(self) -> Dict[str, Any]:
        """Plain, JSON-ready form (worker processes, the remote agent, the study)."""
        return {"fields": [{"name": f.name, "dtype": f.dtype, "shape": list(f.shape), "high": f.high}
                           for f in self.fields],
                "call": self.call, "sequence_length": self.sequence_length, "padding": self.padding}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "InputSpec":
        from hwprune.errors import ModelError

        try:
            fields = tuple(InputField(str(f["name"]), str(f["dtype"]),
                                      tuple(None if s is None else int(s) for s in f["shape"]),
                                      None if f.get("high") is None else int(f["high"])) for f in d["fields"])
            spec = cls(fields, str(d.get("call", "positional")),
                       None if d.get("sequence_length") is None else int(d["sequence_length"]),
                       float(d.get("padding") or 0.0))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"input spec {str(d)[:200]} is not valid ({type(e).__name__}: {e})") from None
        if spec.sequence_length is not None and not 1 <= spec.sequence_length <= 65536:
            raise ModelError(f"input spec: sequence_length {spec.sequence_length} is not in [1, 65536]")
        # the same checks as the text form (a spec arriving over the agent's wire is untrusted)
        return cls.parse(spec.to_text()).with_sequence_length(spec.sequence_length)

    # -- views ---------------------------------------------------------------------------------------------------

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def is_image(self) -> bool:
        """The default single float input named ``input`` (what every path assumed before specs)."""
        return len(self.fields) == 1 and self.fields[0].name == IMAGE_INPUT_NAME and \
            self.fields[0].dtype == "float32" and None not in self.fields[0].shape

    @property
    def has_tokens(self) -> bool:
        return any(f.dtype == "int64" for f in self.fields)

    def with_sequence_length(self, sequence_length: Optional[int]) -> "InputSpec":
        """This spec with its sequence length set (only where the text left it to the profile)."""
        if sequence_length is None or not any(None in f.shape for f in self.fields):
            return self
        return dataclasses.replace(self, sequence_length=int(sequence_length))

    def for_profile(self, profile: Any) -> "InputSpec":
        """The spec a profile measures: sequence length from the profile unless the spec fixes it."""
        if self.sequence_length is not None:
            return self
        return self.with_sequence_length(getattr(profile, "sequence_length", None))

    def with_vocab(self, vocab_size: Optional[int]) -> "InputSpec":
        """Token ids bounded by ``vocab_size`` where the spec gave no bound (``input_ids`` only)."""
        if not vocab_size:
            return self
        fields = tuple(dataclasses.replace(f, high=int(vocab_size))
                       if f.dtype == "int64" and f.high is None and f.name == "input_ids" else f for f in self.fields)
        return dataclasses.replace(self, fields=fields)

    def shapes(self, batch: int = 1) -> Dict[str, Tuple[int, ...]]:
        """Every input's full shape (batch first)."""
        return {f.name: (int(batch), *f.sample_shape(self.sequence_length)) for f in self.fields}

    def describe(self, batch: Optional[int] = None) -> str:
        """Short human form: ``(3, 224, 224)`` for an image, ``input_ids[1, 128] int64, ...`` otherwise."""
        if self.is_image and batch is None:
            return str(tuple(self.fields[0].shape))
        shapes = self.shapes(batch or 1)
        return ", ".join(f"{f.name}{list(shapes[f.name])} {f.dtype}" for f in self.fields)

    # -- values --------------------------------------------------------------------------------------------------

    def numpy_feeds(self, batch: int = 1, seed: int = 0) -> Dict[str, Any]:
        """ONNX Runtime feeds: name -> numpy array (float32 normal, int64 ids / ones / zeros)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        out = {}
        for f in self.fields:
            shape = (int(batch), *f.sample_shape(self.sequence_length))
            if f.fill == "normal":
                out[f.name] = rng.standard_normal(shape).astype(np.float32)
            elif f.fill == "ids":
                out[f.name] = rng.integers(0, f.high, size=shape, dtype=np.int64)
            elif f.fill == "ones":
                out[f.name] = np.ones(shape, dtype=np.int64)
                masked = int(round(self.padding * shape[-1]))
                if masked:  # padded sequences: the last positions left out (at least one kept)
                    out[f.name][..., shape[-1] - min(masked, shape[-1] - 1):] = 0
            else:
                out[f.name] = np.zeros(shape, dtype=np.int64)
        return out

    def example(self, batch: int = 1, seed: int = 0):
        """Torch example inputs in the model's call convention: one tensor for the default image spec (as
        before), a tuple (positional) or a dict (keyword) otherwise. torch-pruning takes all three."""
        import torch

        if self.is_image:
            g = torch.Generator().manual_seed(seed)
            return torch.randn(int(batch), *self.fields[0].shape, generator=g)
        tensors = {k: torch.from_numpy(v) for k, v in self.numpy_feeds(batch, seed).items()}
        return tensors if self.call == "keyword" else tuple(tensors[n] for n in self.names)


def measured_inputs(spec: InputSpec, profile: Any) -> Any:
    """What latency code is handed for ``profile``: the plain batch-first shape for the one image input (exactly
    as before specs: same cache keys, same worker messages), otherwise the spec at the profile's sequence length
    (backends take the batch from the profile)."""
    if spec.is_image:
        return (int(profile.batch_size), *spec.fields[0].shape)
    return spec.for_profile(profile)


def as_spec(inputs: Any) -> InputSpec:
    """An InputSpec from what latency code is handed: a spec, or a plain batch-first shape (the image input)."""
    if isinstance(inputs, InputSpec):
        return inputs
    return InputSpec.image(tuple(int(d) for d in inputs)[1:])


def inputs_key(inputs: Any) -> Any:
    """What a latency cache key records of the inputs: the shape list for a plain shape (unchanged keys for image
    models), the spec's text and sequence length otherwise."""
    if isinstance(inputs, InputSpec):
        return {"inputs": inputs.to_text(), "sequence_length": inputs.sequence_length}
    return [int(d) for d in inputs]


def call_model(model: Any, example: Any) -> Any:
    """``model`` run on ``example`` in its call convention (tensor, positional tuple or keyword dict)."""
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


def inputs_to_wire(inputs: Any) -> Dict[str, Any]:
    """JSON form of what latency code is handed, for a worker process or the remote agent: ``{"shape": [...]}``
    for a plain shape (what both spoke before specs), ``{"inputs": spec}`` otherwise."""
    if isinstance(inputs, InputSpec):
        return {"inputs": inputs.to_dict()}
    return {"shape": [int(d) for d in inputs]}


def inputs_from_wire(req: Dict[str, Any], shape_key: str = "shape") -> Any:
    """The inverse of ``inputs_to_wire``: an InputSpec, or the plain shape list under ``shape_key``."""
    if req.get("inputs") is not None:
        return InputSpec.from_dict(req["inputs"])
    return [int(d) for d in req[shape_key]]
