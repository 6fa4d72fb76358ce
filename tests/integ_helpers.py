"""Helpers for the integration tests against the real sglang and verl packages.

Nothing here imports sglang or verl at module import time: spawned ranks import
this module too, and the tests skip cleanly when the packages are missing.

* :func:`require` skips a test module (pytest) when a package is not
  installed, with a reason saying how to install the integration extras.
* :func:`ensure_torchvision_importable` works around the CUDA build of
  torchvision (the only one on PyPI) failing to load next to a CPU torch;
  call it before importing sglang or verl in every process, spawned ranks
  included.
* :func:`stub_cuda_kernels` stands in for ``sgl_kernel`` (SGLang's CUDA
  kernels, which cannot load on a CPU machine) where a release's scheduler or
  engine imports it: sglang 0.5.5 and 0.5.12.
* :func:`make_sglang_requests` / :func:`make_verl_requests` build realistic
  payloads from the real classes; :func:`plain_rollout_batch` builds dicts
  shaped like rollout requests, for machines without verl.
* :func:`mesh_checks_plain` and :func:`verl_mesh_checks` are the per-rank
  bodies of the mesh / rank-trap checks (for ``run_distributed``, over gloo
  or NCCL), with their assertions in ``assert_mesh_checks_plain`` and
  ``assert_verl_mesh_checks``; the gloo and the NCCL test files share them.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

INSTALL_HINT = ("install the integration extras: pip install -c constraints.txt -r requirements-integrations.txt "
                "&& pip install --no-deps -c constraints.txt -r requirements-integrations-nodeps.txt")


def installed(dist_name: str) -> bool:
    """Whether the distribution is installed (no import: importing sglang costs seconds)."""
    import importlib.metadata
    try:
        importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def require(*dist_names: str) -> None:
    """Skip the calling test module unless every distribution is installed."""
    import pytest
    missing = [d for d in dist_names if not installed(d)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; {INSTALL_HINT}", allow_module_level=True)


def require_shipped_sglang(dist_name: str = "verl") -> None:
    """Skip the calling test module unless the installed sglang is the one ``dist_name`` pins.

    verl pins sglang exactly for its SGLang rollout (``sglang[...]==X; extra ==
    "sglang"``); its rollout module does not import next to another release,
    and no user runs such a pair. `make test-releases` builds the pair.
    """
    import importlib.metadata
    import re

    import pytest
    pins = [m.group(1) for r in importlib.metadata.requires(dist_name) or ()
            if (m := re.match(r"sglang(?:\[[^]]*\])?==([^;\s]+)\s*;.*extra\s*==\s*.sglang.", r))]
    have = importlib.metadata.version("sglang") if installed("sglang") else None
    if pins and have != pins[0]:
        pytest.skip(f"{dist_name} {importlib.metadata.version(dist_name)} pins sglang {pins[0]} for its rollout, "
                    f"installed: {have}; `make test-releases` runs verl 0.6.1 with sglang 0.5.5",
                    allow_module_level=True)


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work when only its CUDA build is installed next to CPU torch
    (see fastbcast.bench.payloads.ensure_torchvision_importable); call it before importing
    sglang or verl in every process, spawned ranks included."""
    from fastbcast.bench.payloads import ensure_torchvision_importable as ensure
    ensure()


class _AnyKernel:
    """Any attribute, call or base class: what importing code asks of a kernel module."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __mro_entries__(self, bases):
        return (object,)


class _KernelStubFinder:
    """Finds ``sgl_kernel`` and its submodules as empty modules whose every name is an _AnyKernel."""

    PREFIX = "sgl_kernel"

    def find_spec(self, fullname, path=None, target=None):
        import importlib.machinery

        if fullname == self.PREFIX or fullname.startswith(self.PREFIX + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        import types

        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: _AnyKernel().__getattr__(name)
        return module

    def exec_module(self, module):
        pass


def stub_cuda_kernels() -> bool:
    """Let ``sgl_kernel`` imports succeed on a CPU machine when the real one is absent.

    sglang 0.5.5's engine and 0.5.12's scheduler import it at module level
    (``from sgl_kernel.kvcacheio import ...``); nothing these tests run calls
    a kernel. Returns whether the stand-in was installed. Call it before
    importing those modules, in every process.
    """
    if importlib.util.find_spec("sgl_kernel") is not None or any(
            isinstance(f, _KernelStubFinder) for f in sys.meta_path):
        return False
    sys.meta_path.append(_KernelStubFinder())
    return True


# ---------------------------------------------------------------------------
# Payloads

class _ByteTokenizer:
    """Just enough of a tokenizer for SamplingParams.normalize()."""

    def encode(self, s, add_special_tokens=False):
        return list(s.encode())


def make_sglang_requests(n: int, seed: int = 0, min_len: int = 16, max_len: int = 600) -> list:
    """``n`` realistic TokenizedGenerateReqInput objects (array('q') token ids, time_stats=None)."""
    import random
    from array import array

    from sglang.srt.managers.io_struct import SessionParams, TokenizedGenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    rng = random.Random(seed)
    out = []
    for i in range(n):
        sp = SamplingParams(max_new_tokens=1024, temperature=0.8, top_p=0.95, top_k=40,
                            stop=["</s>", "\n\nUser:"], stop_token_ids=[151643, 151645],
                            sampling_seed=1234 + seed * 1000 + i)
        sp.normalize(_ByteTokenizer())
        sp.verify(vocab_size=151936)
        length = rng.randint(min_len, max_len)
        out.append(TokenizedGenerateReqInput(
            rid=f"{seed:08x}{i:024x}", input_text=None,
            input_ids=array("q", [rng.randrange(151936) for _ in range(length)]),
            input_embeds=None, mm_inputs=None, token_type_ids=None, sampling_params=sp,
            return_logprob=bool(i % 2), logprob_start_len=-1, top_logprobs_num=i % 3,
            token_ids_logprob=None, stream=bool(i % 3 == 0),
            session_params=SessionParams(id=f"s{seed}", replace=False), time_stats=None))
    return out


def make_verl_requests(n: int, seed: int = 0, tensors: bool = True) -> list:
    """``n`` AsyncRolloutRequest objects built with model_construct (no tokenizer needed).

    tensors=True: token fields are (1, L) tensors as in verl 0.5; response_ids
    and the other response fields are views into the prompt+response tensors,
    as verl's own slicing makes them. tensors=False: plain lists (verl <= 0.4).
    """
    import random

    import torch
    from verl.tools.schemas import (OpenAIFunctionCallSchema, OpenAIFunctionParametersSchema,
                                    OpenAIFunctionPropertySchema, OpenAIFunctionSchema, OpenAIFunctionToolCall,
                                    OpenAIFunctionToolSchema)
    from verl.workers.rollout.schemas import (AsyncRolloutRequest, AsyncRolloutRequestStateEnum,
                                              FinishReasonTypeEnum, Message, TokenizationSanityCheckModeEnum)

    tool = OpenAIFunctionToolSchema(type="function", function=OpenAIFunctionSchema(
        name="calc_gsm8k_reward", description="A tool for calculating the reward of gsm8k.",
        parameters=OpenAIFunctionParametersSchema(
            type="object", required=["answer"],
            properties={"answer": OpenAIFunctionPropertySchema(type="string", description="The answer.")})))
    modes = list(TokenizationSanityCheckModeEnum)

    rng = random.Random(seed)
    states = list(AsyncRolloutRequestStateEnum)
    out = []
    for i in range(n):
        p_len, r_len = rng.randint(8, 200), rng.randint(1, 300)
        total = p_len + r_len
        ids = [rng.randrange(151936) for _ in range(total)]
        mask = [0] * p_len + [rng.randint(0, 1) for _ in range(r_len)]
        call = OpenAIFunctionToolCall(id=f"call_{seed}_{i}", function=OpenAIFunctionCallSchema(
            name="calc_gsm8k_reward", arguments={"answer": str(rng.randrange(1000))}))
        messages = [
            Message(role="system", content="You are a helpful assistant."),
            Message(role="user", content=f"Question {seed}.{i}: what is {i} + {seed}?"),
            Message(role="assistant", content="Let me compute that.", tool_calls=[call]),
            Message(role="tool", content=f"{i + seed}"),
        ]
        if tensors:
            input_ids = torch.tensor([ids], dtype=torch.int64)
            attention_mask = torch.ones_like(input_ids)
            position_ids = torch.arange(total, dtype=torch.int64).unsqueeze(0)
            loss_mask = torch.tensor([mask], dtype=torch.bool)
            token = dict(
                input_ids=input_ids, prompt_ids=input_ids[..., :p_len], response_ids=input_ids[..., p_len:],
                attention_mask=attention_mask, prompt_attention_mask=attention_mask[..., :p_len],
                response_attention_mask=attention_mask[..., p_len:],
                position_ids=position_ids, prompt_position_ids=position_ids[..., :p_len],
                response_position_ids=position_ids[..., p_len:],
                loss_mask=loss_mask, prompt_loss_mask=loss_mask[..., :p_len],
                response_loss_mask=loss_mask[..., p_len:])
        else:
            token = dict(
                input_ids=ids, prompt_ids=ids[:p_len], response_ids=ids[p_len:],
                attention_mask=[1] * total, prompt_attention_mask=[1] * p_len,
                response_attention_mask=[1] * r_len,
                position_ids=list(range(total)), prompt_position_ids=list(range(p_len)),
                response_position_ids=list(range(p_len, total)),
                loss_mask=mask, prompt_loss_mask=mask[:p_len], response_loss_mask=mask[p_len:])
        out.append(AsyncRolloutRequest.model_construct(
            batch_data_id=seed, rollout_offset=i, request_id=f"req-{seed}-{i}",
            state=states[i % len(states)], messages=messages,
            multi_modal_keys=["image", "video"], multi_modal_data={"image": [], "video": []},
            tool_schemas=[tool] if i % 2 else None,
            tools_kwargs={"calc_gsm8k_reward": {"create_kwargs": {"ground_truth": str(i)}}},
            interaction_kwargs={}, reward_scores={"calc_gsm8k_reward": 0.5 * i},
            max_prompt_len=1024, max_response_len=1024, max_model_len=2048,
            metrics={"turns": [i, seed],
                     "finish_reason": [FinishReasonTypeEnum.from_str(["stop", "length", "tool_calls"][i % 3])]},
            use_inference_chat_template=True,
            tokenization_sanity_check_mode=modes[i % len(modes)],
            generation_prompt_ids=input_ids[..., p_len - 3:p_len] if tensors else ids[p_len - 3:p_len],
            base_conv_wo_gen_prompt_end_pos=p_len - 3, base_conv_with_gen_prompt_end_pos=p_len,
            **token))
    return out


def plain_rollout_batch(n: int, seed: int = 0, device=None, tokens: int = 300) -> list:
    """Dict payloads shaped like rollout requests; needs neither verl nor sglang.

    With ``device`` (e.g. "cuda"), each request also carries its token ids as
    an int64 tensor on that device.
    """
    import random

    import torch

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p_len, r_len = rng.randint(8, tokens), rng.randint(1, tokens)
        ids = [rng.randrange(151936) for _ in range(p_len + r_len)]
        req = {
            "batch_data_id": seed, "rollout_offset": i, "request_id": f"req-{seed}-{i}",
            "state": ["pending", "running", "completed"][i % 3],
            "messages": [{"role": "user", "content": f"Question {seed}.{i}"},
                         {"role": "assistant", "content": "Answer.", "tool_calls": None}],
            "prompt_ids": ids[:p_len], "response_ids": ids[p_len:],
            "response_loss_mask": [rng.randint(0, 1) for _ in range(r_len)],
            "reward_scores": {"acc": float(i % 2)}, "metrics": {"turns": [i, seed]},
            "finish_reason": ("stop", 151645) if i % 2 else None,
        }
        if device is not None:
            req["input_ids"] = torch.tensor(ids, dtype=torch.int64, device=device).view(1, -1)
        out.append(req)
    return out


def same(a, b) -> bool:
    """Deep equality that also compares tensors (values, dtype, shape, device type) and exact types."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
                and a.device.type == b.device.type and torch.equal(a.cpu(), b.cpu()))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    fields = getattr(type(a), "model_fields", None)  # pydantic v2 (== raises on tensor fields)
    if fields is not None:
        return all(same(getattr(a, f), getattr(b, f)) for f in fields)
    return a == b


def _outcome(fn):
    """Run fn(); ("ok", value) or (exception type name, message)."""
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return (type(e).__name__, str(e))


def mesh_checks_plain(rank: int, world_size: int, dp: int, tp: int, device_type: str,
                      force_cpu_device: bool) -> dict:
    """Rank-trap and mesh checks with dict payloads (no verl, no sglang), on one rank.

    Builds init_device_mesh(device_type, (dp, tp, 1), ("dp", "tp", "pp")) as
    verl's rollout does; every TP group sends its own batch at the same time.
    Returns a dict of outcomes for the test to assert on.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import fastbcast
    from fastbcast.integrations.verl import broadcast_rollout

    mesh = init_device_mesh(device_type, (dp, tp, 1), mesh_dim_names=("dp", "tp", "pp"))
    tp_group = mesh["tp"].get_group()
    src = mesh["tp"].mesh[0].item()
    tp_rank = mesh.get_local_rank("tp")
    dp_rank = mesh.get_local_rank("dp")
    is_src = tp_rank == 0
    tensor_device = "cuda" if device_type == "cuda" else "cpu"
    res = {"rank": dist.get_rank(), "tp_rank": tp_rank, "dp_rank": dp_rank, "src": src}

    def batch(seed, n=4, tokens=300):
        return plain_rollout_batch(n, seed=seed, device=tensor_device, tokens=tokens)

    mine = batch(dp_rank)
    # The rank trap: the TP-local rank where a global one belongs.
    res["wrong_rank"] = _outcome(lambda: same(fastbcast.broadcast_pyobj(
        [mine] if is_src else [None], rank=tp_rank, dist_group=tp_group, src=src,
        force_cpu_device=force_cpu_device, allow_pickle=False), [mine]))
    # The fixed call, strict: every TP group gets its own batch.
    res["global_rank"] = _outcome(lambda: same(fastbcast.broadcast_pyobj(
        [mine] if is_src else [None], rank=dist.get_rank(), dist_group=tp_group, src=src,
        force_cpu_device=force_cpu_device, allow_pickle=False), [mine]))
    res["empty"] = _outcome(lambda: fastbcast.broadcast_pyobj(
        [] if is_src else None, dist.get_rank(), tp_group, src, force_cpu_device, allow_pickle=False))
    res["ip_port"] = _outcome(lambda: fastbcast.broadcast_pyobj(
        ["10.0.0.%d" % dp_rank, 40000 + dp_rank] if is_src else None, dist.get_rank(), tp_group, src,
        force_cpu_device, allow_pickle=False) == ["10.0.0.%d" % dp_rank, 40000 + dp_rank])
    # The mesh layer: no rank at all. A small batch, then one over the 64 KiB first chunk.
    res["rollout"] = _outcome(lambda: same(broadcast_rollout(mine if is_src else None, mesh, "tp"), mine))
    big = batch(100 + dp_rank, n=64, tokens=800)
    res["rollout_big"] = _outcome(lambda: same(broadcast_rollout(big if is_src else None, mesh), big))
    dist.barrier()
    return res


def assert_mesh_checks_plain(results: list, dp: int, tp: int) -> None:
    """The assertions for mesh_checks_plain's per-rank results."""
    assert len(results) == dp * tp
    for r, res in enumerate(results):
        assert res["rank"] == r and res["src"] == r - r % tp and res["tp_rank"] == r % tp
        # A rank whose TP-local rank equals its global rank (only in the first
        # TP group, ranks 0..tp-1) made a correct call by accident, so it
        # succeeds; everywhere else the wrong rank is a ValueError raised before
        # any collective, so nothing hangs and nobody gets [].
        if r < tp:
            assert res["wrong_rank"] == ("ok", True), (r, res["wrong_rank"])
        else:
            kind, msg = res["wrong_rank"]
            assert kind == "ValueError", (r, res["wrong_rank"])
            assert f"rank={r % tp} is not this process's global rank" in msg and "group-local" in msg, msg
        for key in ("global_rank", "ip_port", "rollout", "rollout_big"):
            assert res[key] == ("ok", True), (r, key, res[key])
        assert res["empty"] == ("ok", []), (r, res["empty"])


def _check_verl_request(a, b) -> bool:
    """Field-by-field equality of two AsyncRolloutRequests, exact enum types included."""
    from verl.workers.rollout.schemas import (AsyncRolloutRequest, AsyncRolloutRequestStateEnum,
                                              TokenizationSanityCheckModeEnum)
    assert type(b) is AsyncRolloutRequest, type(b)
    # str-subclass enums must come back as the enum, not as a plain str.
    assert type(b.state) is AsyncRolloutRequestStateEnum, type(b.state)
    assert type(b.tokenization_sanity_check_mode) is TokenizationSanityCheckModeEnum
    for f in AsyncRolloutRequest.model_fields:
        x, y = getattr(a, f), getattr(b, f)
        assert same(x, y), f
        # response_ids and the other slices are views into input_ids' storage
        # on the source; they arrive as tensors of their own with the same values.
        if hasattr(y, "is_contiguous") and b is not a:
            assert y.is_contiguous(), f
    return True


def verl_mesh_checks(rank: int, world_size: int, dp: int, tp: int, device_type: str,
                     force_cpu_device: bool) -> dict:
    """The verl rollout broadcast checks with real AsyncRolloutRequest objects, on one rank.

    Imports verl's real ``SGLangRollout`` module (and with it SGLang's engine)
    and calls the binding its three call sites use, with their arguments.
    Mesh as verl builds it.
    """
    ensure_torchvision_importable()
    stub_cuda_kernels()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    import verl.workers.rollout.sglang_rollout.sglang_rollout as rollout
    import verl.workers.rollout.sglang_rollout.utils as utils
    from verl.workers.rollout.schemas import FinishReasonTypeEnum

    import fastbcast
    import fastbcast.integrations.verl as fb_verl
    verl_original = rollout.broadcast_pyobj
    assert verl_original is utils.broadcast_pyobj and hasattr(rollout, "SGLangRollout")

    mesh = init_device_mesh(device_type, (dp, tp, 1), mesh_dim_names=("dp", "tp", "pp"))
    me = dist.get_rank()
    tp_rank = mesh["tp"].get_local_rank()
    dp_rank = mesh.get_local_rank("dp")
    is_src = tp_rank == 0
    # The arguments of verl's three call sites.
    group, src = mesh["tp"].get_group(), mesh["tp"].mesh[0].item()
    tensor_reqs = make_verl_requests(3, seed=dp_rank, tensors=True)
    list_reqs = make_verl_requests(3, seed=10 + dp_rank, tensors=False)
    output = {"text": f"answer {dp_rank}", "output_ids": list(range(dp_rank, dp_rank + 40)),
              "meta_info": {"id": f"gen-{dp_rank}", "prompt_tokens": 12, "completion_tokens": 40,
                            "finish_reason": {"type": "stop", "matched": 151645},
                            "output_token_logprobs": [(-0.25 * k, k, None) for k in range(40)],
                            "reason": FinishReasonTypeEnum.STOP}}
    res = {"rank": me, "tp_rank": tp_rank, "src": src}

    def check_reqs(got, want):
        assert isinstance(got, list) and len(got) == 1 and len(got[0]) == len(want), got
        return all(_check_verl_request(a, b) for a, b in zip(want, got[0]))

    # (a) The bug: verl's own broadcast_pyobj with the TP-local rank.
    res["bug"] = _outcome(lambda: verl_original(
        data=[tensor_reqs] if is_src else [None], rank=tp_rank, dist_group=group, src=src,
        force_cpu_device=force_cpu_device))
    if res["bug"][0] == "ok":
        got = res["bug"][1]
        res["bug"] = ("ok", "[]" if got == [] else ("equal" if check_reqs(got, tensor_reqs) else "different"))
    dist.barrier()

    # (c) The mesh layer: no rank to pass. It trusts verl's schema modules per
    # call, so this works before anything is trusted process-wide.
    res["rollout"] = _outcome(lambda: check_reqs(
        [fb_verl.broadcast_rollout(tensor_reqs if is_src else None, mesh, "tp")], tensor_reqs))
    res["rollout_lists"] = _outcome(lambda: check_reqs(
        [fb_verl.broadcast_rollout(list_reqs if is_src else None, mesh)], list_reqs))

    # The plain drop-in rebuilds only trusted classes (patch() would trust these).
    fastbcast.trust(*fb_verl.SCHEMA_MODULES)
    # (b) fastbcast's drop-in with the same wrong rank.
    res["trap"] = _outcome(lambda: check_reqs(fastbcast.broadcast_pyobj(
        data=[tensor_reqs] if is_src else [None], rank=tp_rank, dist_group=group, src=src,
        force_cpu_device=force_cpu_device, allow_pickle=False), tensor_reqs))
    dist.barrier()

    # (c) The fixed call (global rank), strict: every TP group sends its own requests at once.
    for name, reqs in (("tensor_ids", tensor_reqs), ("list_ids", list_reqs)):
        res[name] = _outcome(lambda: check_reqs(fastbcast.broadcast_pyobj(
            data=[reqs] if is_src else [None], rank=me, dist_group=group, src=src,
            force_cpu_device=force_cpu_device, allow_pickle=False), reqs))

    # The integration: the vendored function rebound, called exactly as verl's three sites call it.
    fb_verl.patch(allow_pickle=False)
    res["patched"] = rollout.broadcast_pyobj is fb_verl.broadcast_pyobj is utils.broadcast_pyobj
    res["patched_modules"] = fb_verl.patched_modules()
    res["patched_ip_port"] = _outcome(lambda: rollout.broadcast_pyobj(
        ["10.0.0.%d" % dp_rank, 40000 + dp_rank], rank=me, dist_group=mesh.get_group("tp"), src=src,
        force_cpu_device=False) == ["10.0.0.%d" % dp_rank, 40000 + dp_rank])
    res["patched_output"] = _outcome(lambda: same(rollout.broadcast_pyobj(
        data=[output if is_src else None], rank=me, dist_group=group, src=src, force_cpu_device=False),
        [output]))
    res["patched_reqs"] = _outcome(lambda: check_reqs(rollout.broadcast_pyobj(
        data=[tensor_reqs if is_src else None], rank=me, dist_group=group, src=src, force_cpu_device=False),
        tensor_reqs))
    res["patched_trap"] = _outcome(lambda: check_reqs(rollout.broadcast_pyobj(
        data=[tensor_reqs if is_src else None], rank=tp_rank, dist_group=group, src=src,
        force_cpu_device=False), tensor_reqs))
    dist.barrier()
    fb_verl.unpatch()
    res["unpatched"] = rollout.broadcast_pyobj is verl_original is utils.broadcast_pyobj
    dist.barrier()
    return res


def assert_verl_mesh_checks(results: list, dp: int, tp: int) -> None:
    """The assertions for verl_mesh_checks's per-rank results."""
    assert len(results) == dp * tp
    for r, res in enumerate(results):
        assert res["rank"] == r and res["tp_rank"] == r % tp and res["src"] == r - r % tp
        first_group = r < tp
        # (a) verl's function: only the first TP group works; every rank of
        # the others believes it receives, and gets [].
        assert res["bug"] == ("ok", "equal" if first_group else "[]"), (r, res["bug"])
        # (b) fastbcast: in the first TP group the TP-local rank equals the
        # global rank, so the call is correct and succeeds; on every other
        # rank it is a ValueError raised before any collective (no hang, no []).
        for key in ("trap", "patched_trap"):
            if first_group:
                assert res[key] == ("ok", True), (r, key, res[key])
            else:
                kind, msg = res[key]
                assert kind == "ValueError" and "global rank" in msg and "group-local" in msg, (r, key, res[key])
        # (c) the fixed call and the mesh layer, without pickle.
        for key in ("tensor_ids", "list_ids", "rollout", "rollout_lists", "patched_ip_port",
                    "patched_output", "patched_reqs"):
            assert res[key] == ("ok", True), (r, key, res[key])
        assert res["patched"] and res["unpatched"], (r, res["patched"], res["unpatched"])
        assert {"verl.workers.rollout.sglang_rollout.utils",
                "verl.workers.rollout.sglang_rollout.sglang_rollout"} <= set(res["patched_modules"])
