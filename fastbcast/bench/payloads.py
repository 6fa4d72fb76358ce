"""Benchmark payloads, generated here so results compare across machines.

``PAYLOADS`` maps a name to a zero-argument factory. Every factory is
deterministic (fixed seeds), so every rank of a benchmark builds an identical
copy locally and can check what it received against it.

The four plain-type shapes reproduce the reference shapes the project's
numbers are anchored to: lists of verl ``AsyncRolloutRequest``-like dicts made
of str / int / float / list[int], with the same names, request counts, token
lengths and random streams, so their pickled sizes match the reference
exactly (``pickle.dumps(payload)``, default protocol)::

  name                     requests  prompt+response   pickled bytes
  tiny_1req                       1        16 + 16             2,639
  sched_step_8req                 8       128 + 0             33,412
  rollout_64x1k                  64       256 + 768        1,526,029
  rollout_256x4k                256      1024 + 3072      23,625,086

Variants:

  empty                    ``[]``: what SGLang's scheduler broadcasts on an
                           idle step (most steps of a lightly loaded server).
  rollout_64x1k_tensor     the rollout_64x1k requests with every token list
                           (input/prompt/response ids, attention, position and
                           loss masks) as a CPU tensor: token ids and position
                           ids int64 (what tokenizers and HF models use), masks
                           int32.
  rollout_256x4k_tensor    the same for rollout_256x4k.
  sched_structs            one scheduler step: 32 ``SchedRequest`` dataclass
                           instances (an enum state, a nested
                           ``SamplingParams`` dataclass, a few ints / floats /
                           strs, 24..96 token ids each).
  cuda_tensors             only when CUDA is available (absent from PAYLOADS
                           otherwise): a dict with 16 bf16 4096x1024 weight
                           tensors (8 MiB each), four small tensors (fp32,
                           bool, int64, fp16) and a little metadata, all on
                           the current CUDA device: about 128.0 MiB of tensor
                           data (134,230,016 bytes).

Sizes in bytes (fastbcast: FORMAT_VERSION 1, default options, measured when
this was written; msgspec: ``msgspec.msgpack.encode``)::

  name                        pickled       msgspec     fastbcast
  tiny_1req                     2,639         2,341         2,329
  sched_step_8req              33,412        29,399        29,297
  sched_structs                11,986        14,277        18,505
  rollout_64x1k             1,526,029     1,266,751     1,153,283
  rollout_64x1k_tensor      3,462,746           n/a     3,273,731
  rollout_256x4k           23,625,086    19,425,311    17,261,571
  rollout_256x4k_tensor    51,603,215           n/a    50,843,651

Run ``python -m fastbcast.bench.payloads`` to print every size on this machine
(pickled, msgspec, and fastbcast's encoding when the extension is built).

The dataclasses and the enum of ``sched_structs`` live at module level so they
pickle by reference and can be registered with ``fastbcast.register``
(``STRUCT_CLASSES`` lists them); ``MSGSPEC_TYPES`` gives msgspec the decode
type it needs to rebuild them.
"""
from __future__ import annotations

import dataclasses
import enum
import random
import string
from typing import Callable, Dict, List, Optional

__all__ = [
    "PAYLOADS", "PAYLOAD_NOTES", "REFERENCE_PICKLED_SIZES", "STRUCT_CLASSES",
    "MSGSPEC_TYPES", "RequestState", "SamplingParams", "SchedRequest",
    "rollout_requests", "tensorize", "sched_structs", "cuda_tensors",
    "default_payload_names",
]

# Characters the synthetic message texts are drawn from. The doubled space
# weights spaces twice; order matters, since rng.choice indexes into it.
_TEXT_ALPHABET = string.ascii_letters + "  "
_VOCAB = 151000  # Qwen2-sized vocabulary


def _random_text(rng: random.Random, length: int) -> str:
    pick = rng.choice
    return "".join([pick(_TEXT_ALPHABET) for _ in range(length)])


def _one_request(rng: random.Random, index: int, prompt_len: int, resp_len: int) -> dict:
    draw = rng.randrange
    prompt = [draw(_VOCAB) for _ in range(prompt_len)]
    response = [draw(_VOCAB) for _ in range(resp_len)]
    total = prompt_len + resp_len
    request_id = "%032x" % rng.getrandbits(128)
    system_text = _random_text(rng, 120)
    user_text = _random_text(rng, 400)
    assistant_text = _random_text(rng, 800)
    # The key order below is part of the shape: pickle and MessagePack keep it.
    return {
        "batch_data_id": index // 8,
        "rollout_offset": index % 8,
        "request_id": request_id,
        "state": "completed",
        "messages": [
            {"role": "system", "content": system_text},
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": assistant_text},
        ],
        "tools": None,
        "input_ids": prompt + response,
        "prompt_ids": prompt,
        "response_ids": response,
        "attention_mask": [1] * total,
        "prompt_attention_mask": [1] * prompt_len,
        "response_attention_mask": [1] * resp_len,
        "position_ids": list(range(total)),
        "prompt_position_ids": list(range(prompt_len)),
        "response_position_ids": list(range(prompt_len, total)),
        "loss_mask": [0] * prompt_len + [1] * resp_len,
        "prompt_loss_mask": [0] * prompt_len,
        "response_loss_mask": [1] * resp_len,
        "reward_scores": {"gsm8k": float(rng.random())},
        "max_prompt_len": 1024,
        "max_response_len": 4096,
        "max_model_len": 8192,
        "metrics": {"turns": 2, "tool_calls": 0},
        "finish_reason": "stop",
    }


def rollout_requests(n_requests: int, prompt_len: int, resp_len: int, seed: int = 0) -> List[dict]:
    """A rollout batch: ``n_requests`` request dicts drawn from one seeded stream."""
    rng = random.Random(seed)
    return [_one_request(rng, i, prompt_len, resp_len) for i in range(n_requests)]


# Token-list fields of a request and the tensor dtype each becomes.
_ID_FIELDS = ("input_ids", "prompt_ids", "response_ids",
              "position_ids", "prompt_position_ids", "response_position_ids")
_MASK_FIELDS = ("attention_mask", "prompt_attention_mask", "response_attention_mask",
                "loss_mask", "prompt_loss_mask", "response_loss_mask")


def tensorize(requests: List[dict]) -> List[dict]:
    """Rollout requests with their token lists as CPU tensors (ids int64, masks int32)."""
    import torch

    out = []
    for req in requests:
        converted = dict(req)
        for key in _ID_FIELDS:
            converted[key] = torch.tensor(req[key], dtype=torch.int64)
        for key in _MASK_FIELDS:
            converted[key] = torch.tensor(req[key], dtype=torch.int32)
        out.append(converted)
    return out


# ---------------------------------------------------------------- sched_structs

class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclasses.dataclass
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop: List[str]


@dataclasses.dataclass
class SchedRequest:
    rid: str
    state: RequestState
    priority: int
    arrival_time: float
    prompt_len: int
    input_ids: List[int]
    sampling: SamplingParams
    lora_path: Optional[str]
    stream: bool


STRUCT_CLASSES = (RequestState, SamplingParams, SchedRequest)


def sched_structs(n_requests: int = 32, seed: int = 1) -> List[SchedRequest]:
    """One scheduler step's new requests as small dataclass instances."""
    rng = random.Random(seed)
    states = list(RequestState)
    out = []
    for i in range(n_requests):
        n_tokens = rng.randrange(24, 97)
        ids = [rng.randrange(_VOCAB) for _ in range(n_tokens)]
        out.append(SchedRequest(
            rid="%032x" % rng.getrandbits(128),
            state=states[i % len(states)],
            priority=rng.randrange(4),
            arrival_time=1.7e9 + rng.random() * 100.0,
            prompt_len=n_tokens,
            input_ids=ids,
            sampling=SamplingParams(
                temperature=round(rng.uniform(0.0, 1.5), 2),
                top_p=round(rng.uniform(0.5, 1.0), 2),
                top_k=rng.choice((-1, 20, 50)),
                max_new_tokens=rng.choice((256, 1024, 4096)),
                stop=["</s>", "<|im_end|>"][: rng.randrange(3)],
            ),
            lora_path=None if i % 4 else "adapters/lora-%d" % (i % 3),
            stream=bool(i % 2),
        ))
    return out


# ------------------------------------------------------------------ cuda_tensors

def cuda_tensors(n_weights: int = 16, rows: int = 4096, cols: int = 1024, device=None) -> dict:
    """A batch of CUDA tensors plus metadata, on ``device`` (default: the current one).

    Values come from a seeded CPU generator, so every rank builds the same data.
    """
    import torch

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator().manual_seed(1234)
    weights = {}
    for i in range(n_weights):
        w = torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(torch.bfloat16)
        weights["model.layers.%d.mlp.up_proj.weight" % i] = w.to(device)
    small = {
        "scale": torch.rand(cols, generator=gen).to(device),
        "valid": (torch.rand(rows, generator=gen) > 0.5).to(device),
        "token_ids": torch.randint(0, _VOCAB, (256,), generator=gen).to(device),
        "bias": torch.randn(cols, generator=gen).to(torch.float16).to(device),
    }
    return {
        "version": 7,
        "names": list(weights),
        "weights": weights,
        "small": small,
        "meta": {"dtype": "bfloat16", "shape": [rows, cols], "step": 1000, "lr": 3e-6},
    }


# ------------------------------------------------------------------ the registry

REFERENCE_PICKLED_SIZES = {
    "tiny_1req": 2_639,
    "sched_step_8req": 33_412,
    "rollout_64x1k": 1_526_029,
    "rollout_256x4k": 23_625_086,
}

PAYLOADS: Dict[str, Callable[[], object]] = {
    "empty": lambda: [],
    "tiny_1req": lambda: rollout_requests(1, 16, 16),
    "sched_step_8req": lambda: rollout_requests(8, 128, 0),
    "sched_structs": lambda: sched_structs(),
    "rollout_64x1k": lambda: rollout_requests(64, 256, 768),
    "rollout_64x1k_tensor": lambda: tensorize(rollout_requests(64, 256, 768)),
    "rollout_256x4k": lambda: rollout_requests(256, 1024, 3072),
    "rollout_256x4k_tensor": lambda: tensorize(rollout_requests(256, 1024, 3072)),
}


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - broken torch install
        return False


if _cuda_available():
    PAYLOADS["cuda_tensors"] = lambda: cuda_tensors()

# msgspec decodes into plain types unless told the type to build.
MSGSPEC_TYPES = {"sched_structs": List[SchedRequest]}

PAYLOAD_NOTES = {
    "empty": "[] (an idle scheduler step)",
    "tiny_1req": "1 request, 16+16 tokens, plain types",
    "sched_step_8req": "8 requests, 128-token prompts, plain types",
    "sched_structs": "32 dataclass requests with an enum field",
    "rollout_64x1k": "64 requests, 256+768 tokens, plain types",
    "rollout_64x1k_tensor": "rollout_64x1k, token lists as CPU tensors",
    "rollout_256x4k": "256 requests, 1024+3072 tokens, plain types",
    "rollout_256x4k_tensor": "rollout_256x4k, token lists as CPU tensors",
    "cuda_tensors": "16 bf16 4096x1024 CUDA tensors + small ones + metadata",
}


def default_payload_names(quick: bool = False) -> List[str]:
    """The payloads a run covers by default, the real request classes last;
    ``quick`` leaves out the 256x4k ones and class payloads of over 8 requests."""
    names = list(PAYLOADS) + list(CLASS_PAYLOADS)
    if quick:
        names = [n for n in names if "256x4k" not in n and not (n in CLASS_PAYLOADS and int(n.split("_")[-1]) > 8)]
    return names


def payload_factory(name: str) -> Callable[[], object]:
    """The factory of a payload of PAYLOADS or CLASS_PAYLOADS."""
    return PAYLOADS[name] if name in PAYLOADS else CLASS_PAYLOADS[name]


def _print_sizes() -> None:  # python -m fastbcast.bench.payloads
    import pickle
    import sys

    try:
        import msgspec
        enc = msgspec.msgpack.Encoder()
    except ImportError:
        enc = None
    fb = None
    try:
        import fastbcast as fb  # noqa: F811
        fb.encode  # noqa: B018
        for cls in STRUCT_CLASSES:
            fb.register(cls)
    except Exception as e:  # the extension may not be built yet
        print("# fastbcast unavailable: %s" % e, file=sys.stderr)
        fb = None
    print("%-24s %14s %14s %14s %14s" % ("payload", "pickled", "reference", "msgspec", "fastbcast"))
    for name, factory in PAYLOADS.items():
        obj = factory()
        pickled = len(pickle.dumps(obj))
        ref = REFERENCE_PICKLED_SIZES.get(name)
        sizes = []
        for f in ((lambda o: len(enc.encode(o))) if enc else None,
                  (lambda o: fb.encode(o).numel()) if fb else None):
            try:
                sizes.append("{:,}".format(f(obj)) if f else "-")
            except Exception:
                sizes.append("n/a")
        print("%-24s %14s %14s %14s %14s" % (
            name, "{:,}".format(pickled), "{:,}".format(ref) if ref else "-", *sizes))


if __name__ == "__main__":
    _print_sizes()


# --------------------------------------------------------------------------
# Real request classes (issue 11): SGLang's per-step TokenizedGenerateReqInput
# (msgspec Structs, array('q') token ids) and verl's AsyncRolloutRequest
# (pydantic, list token ids as in verl <= 0.4). Built only when the packages
# import; receivers trust them by module prefix (CLASS_PAYLOAD_TRUSTED).

def ensure_torchvision_importable() -> None:
    """Makes ``import torchvision`` work when only its CUDA build is installed
    next to a CPU torch: that build fails at import (``operator
    torchvision::nms does not exist``) because its C++ ops cannot load, and
    sglang needs only its Python parts, so defining the two operator schemas
    its import registers fake kernels for is enough. A no-op when torchvision
    imports or is not installed."""
    import sys

    if not _KEEP and "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except ModuleNotFoundError:
            pass
        except RuntimeError as e:
            if "torchvision::nms" not in str(e):
                raise
            for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[mod]
            import torch
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _KEEP.append(lib)  # dropping the Library would remove the definitions
            import torchvision  # noqa: F401,F811


def _import_request_module(name: str):
    import importlib

    ensure_torchvision_importable()
    return importlib.import_module(name)


_KEEP: list = []


def sglang_requests(n: int, seed: int = 0) -> list:
    """`n` sglang TokenizedGenerateReqInput, as the scheduler broadcasts each step."""
    from array import array

    io = _import_request_module("sglang.srt.managers.io_struct")
    sp_mod = _import_request_module("sglang.srt.sampling.sampling_params")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sp = sp_mod.SamplingParams(max_new_tokens=1024, temperature=0.7, top_p=0.9, top_k=50,
                                   stop_token_ids=[151643, 151645], sampling_seed=seed * 1000 + i)
        out.append(io.TokenizedGenerateReqInput(
            rid="%032x" % rng.getrandbits(128), input_text=None,
            input_ids=array("q", (rng.randrange(151936) for _ in range(rng.randint(32, 512)))),
            input_embeds=None, mm_inputs=None, token_type_ids=None, sampling_params=sp,
            return_logprob=i % 2 == 0, logprob_start_len=-1, top_logprobs_num=0, token_ids_logprob=None,
            stream=True, session_params=io.SessionParams(id="s%d" % i, replace=False), time_stats=None))
    return out


def verl_requests(n: int, seed: int = 0) -> list:
    """`n` verl AsyncRolloutRequest with list token ids (built with model_construct)."""
    schemas = _import_request_module("verl.workers.rollout.schemas")
    rng = random.Random(seed)
    states = list(schemas.AsyncRolloutRequestStateEnum)
    out = []
    for i in range(n):
        p_len, r_len = rng.randint(16, 256), rng.randint(16, 512)
        ids = [rng.randrange(151936) for _ in range(p_len + r_len)]
        mask = [0] * p_len + [1] * r_len
        msgs = [schemas.Message(role="user", content=_random_text(rng, 120)),
                schemas.Message(role="assistant", content=_random_text(rng, 200))]
        out.append(schemas.AsyncRolloutRequest.model_construct(
            batch_data_id=seed, rollout_offset=i, request_id="req-%d-%d" % (seed, i), state=states[i % len(states)],
            messages=msgs, tool_schemas=None, tools_kwargs={}, interaction_kwargs={},
            input_ids=ids, prompt_ids=ids[:p_len], response_ids=ids[p_len:],
            attention_mask=[1] * len(ids), prompt_attention_mask=[1] * p_len, response_attention_mask=[1] * r_len,
            position_ids=list(range(len(ids))), prompt_position_ids=list(range(p_len)),
            response_position_ids=list(range(p_len, len(ids))), loss_mask=mask, prompt_loss_mask=mask[:p_len],
            response_loss_mask=mask[p_len:], reward_scores={"acc": float(i % 2)}, max_prompt_len=1024,
            max_response_len=1024, max_model_len=2048, metrics={}, use_inference_chat_template=True,
            tokenization_sanity_check_mode=schemas.TokenizationSanityCheckModeEnum.STRICT,
            generation_prompt_ids=ids[p_len - 3:p_len], base_conv_wo_gen_prompt_end_pos=p_len - 3,
            base_conv_with_gen_prompt_end_pos=p_len))
    return out


CLASS_PAYLOADS: Dict[str, Callable[[], object]] = {
    "sglang_req_1": lambda: sglang_requests(1),
    "sglang_req_8": lambda: sglang_requests(8),
    "sglang_req_64": lambda: sglang_requests(64),
    "verl_req_8": lambda: verl_requests(8),
    "verl_req_64": lambda: verl_requests(64),
    "verl_req_256": lambda: verl_requests(256),
}
# Module prefixes the receivers of each class payload trust.
CLASS_PAYLOAD_TRUSTED = {name: (name.split("_")[0],) for name in CLASS_PAYLOADS}
PAYLOAD_NOTES.update({
    "sglang_req_1": "1 sglang 0.5 TokenizedGenerateReqInput (msgspec Struct, array('q') ids)",
    "sglang_req_8": "8 sglang TokenizedGenerateReqInput",
    "sglang_req_64": "64 sglang TokenizedGenerateReqInput",
    "verl_req_8": "8 verl AsyncRolloutRequest (pydantic, list token ids)",
    "verl_req_64": "64 verl AsyncRolloutRequest",
    "verl_req_256": "256 verl AsyncRolloutRequest",
})


def class_payload_unavailable(name: str):
    """Why a class payload cannot be built here (its package is missing), or None."""
    import importlib.util

    pkg = name.split("_")[0]
    return None if importlib.util.find_spec(pkg) is not None else "%s is not installed" % pkg
