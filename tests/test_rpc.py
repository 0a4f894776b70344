"""RPC workers in the plan, without processes: endpoints, what-if clusters from the catalog, the device order and
names llama.cpp uses, what crosses the network per token (against the byte counts of a proxied CPU run), llama.cpp's
RPC failure texts in one line, the memory per machine, and the 397B on four 2 × RTX 3090 hosts."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from tunerproc import other_protocol_worker

from tuner import speed
from tuner.bench.benchmark import on_workers
from tuner.bench.flagsets import defaults_set, parse_set
from tuner.cli import main
from tuner.errors import TunerError
from tuner.flags import ServerFlags, flags_from_args
from tuner.hardware import (
    DEFAULT_LINK,
    NetworkLink,
    hardware_for,
    parse_endpoint,
    parse_endpoints,
    parse_rpc_gpu_spec,
    rpc_endpoints,
    with_remote_devices,
)
from tuner.models import local_layout, resolve_candidates
from tuner.network import SET_OVERHEAD_BYTES, moe_spill_transfers, rpc_traffic
from tuner.placement import NO_PIPELINE_RULE, Placement, Placer, devices_of
from tuner.planner import DEFAULT_VRAM_BUFFER_BYTES, Wishes, estimate_on, headroom_bytes, plan_for
from tuner.rpc import (
    HEAD,
    describe_remote_devices,
    memory_by_host,
    parse_list_devices,
    probe_endpoint,
    rpc_failure,
    rpc_hardware,
    worker_protocol,
)
from tuner.speed import NETWORK_PART, predict_on
from tuner.synth import SynthSpec, write_synthetic_gguf
from tuner.units import MiB

CLUSTER = "rtx-3090x2@10.0.0.2,rtx-3090x2@10.0.0.3,rtx-3090x2@10.0.0.4"
# The proxied run the byte counts below come from: tuner's synthetic qwen35moe with 8 blocks of width 256 (the
# attention layers 3 and 7), two CPU workers, RPC0 = blocks 0-4, RPC1 = blocks 5-7 and the output, FA on.
PROXY_SPEC = SynthSpec(name="rpc-proxy", n_layer=8, n_embd=256, n_head=4, head_dim=64, ssm_d_state=128,
                       ssm_dt_rank=32, ssm_n_group=16)


@pytest.fixture(scope="module")
def proxy_layout(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("rpc") / "rpc-proxy.gguf"
    write_synthetic_gguf(path, PROXY_SPEC)
    return local_layout(path)


def _cluster():  # type: ignore[no-untyped-def]
    return rpc_hardware(hardware_for("rtx-3090x2"), rpc=None, rpc_gpu=CLUSTER, link=None)


# ------------------------------------------------------------------------------------------------ endpoints


def test_endpoints_are_host_and_port_as_llama_cpp_reads_them() -> None:
    assert parse_endpoints("10.0.0.2:50052, gpu-box.lan:50053") == ("10.0.0.2:50052", "gpu-box.lan:50053")
    assert parse_endpoint("10.0.0.2", default_port=50052) == "10.0.0.2:50052"
    for bad, why in (("10.0.0.2", "needs a port"), ("10.0.0.2:0", "1 to 65535"), ("[::1]:50052", "IPv4 only"),
                     ("fe80::1:50052", "IPv4 only"), ("a b:1", "not a host name"), ("h:x", "1 to 65535")):
        with pytest.raises(TunerError, match=why):
            parse_endpoint(bad)
    with pytest.raises(TunerError, match="named twice"):
        parse_endpoints("10.0.0.2:50052,10.0.0.2:50052")


def test_rpc_gpu_gives_catalog_cards_per_worker_in_llama_cpps_order_and_names() -> None:
    devices = parse_rpc_gpu_spec("rtx-3090x2@10.0.0.2,rtx-4090@10.0.0.3:50053")
    assert [d.llama_name for d in devices] == ["RPC0[10.0.0.2:50052]", "RPC1[10.0.0.2:50052]",
                                               "RPC0[10.0.0.3:50053]"]
    assert [d.name for d in devices] == ["NVIDIA GeForce RTX 3090"] * 2 + ["NVIDIA GeForce RTX 4090"]
    assert all(d.vram_free_bytes == d.vram_total_bytes and d.source == "catalog" for d in devices)
    for bad in ("rtx-3090x2", "@10.0.0.2", "rtx-3090@", "rtx-3090@10.0.0.2,rtx-4090@10.0.0.2"):
        with pytest.raises(TunerError):
            parse_rpc_gpu_spec(bad)


def test_remote_devices_come_first_then_the_local_gpus() -> None:
    """llama.cpp's device order (src/llama.cpp:275-285): RPC devices in --rpc order, then this machine's GPUs."""
    hw = _cluster()
    assert [g.llama_name for g in hw.gpus] == [
        "RPC0[10.0.0.2:50052]", "RPC1[10.0.0.2:50052]", "RPC0[10.0.0.3:50052]", "RPC1[10.0.0.3:50052]",
        "RPC0[10.0.0.4:50052]", "RPC1[10.0.0.4:50052]", "CUDA0", "CUDA1"]
    assert rpc_endpoints(hw.gpus) == ("10.0.0.2:50052", "10.0.0.3:50052", "10.0.0.4:50052")
    assert hw.link is None and hw.network == DEFAULT_LINK
    assert any("1 Gbit/s" in n and "0.2 ms" in n for n in hw.notes), "the assumed link is said"
    with pytest.raises(TunerError, match="named twice"):
        with_remote_devices(hw, parse_rpc_gpu_spec("rtx-3090@10.0.0.2"))


def test_list_devices_output_gives_each_workers_devices_and_memory() -> None:
    text = ("Available devices:\n  CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23000 MiB free)\n"
            "  RPC0: 10.0.0.2:50052 (24135 MiB, 23800 MiB free)\n  RPC1: 10.0.0.2:50052 (24135 MiB, 100 MiB free)\n"
            "  RPC2: 10.0.0.3:50052 (1 MiB, 1 MiB free)\n")
    devices = parse_list_devices(text, "10.0.0.2:50052")
    assert [(d.llama_name, d.vram_total_bytes // MiB, d.vram_free_bytes // MiB) for d in devices] == [
        ("RPC0[10.0.0.2:50052]", 24135, 23800), ("RPC1[10.0.0.2:50052]", 24135, 100)]
    assert all(d.source == "rpc" for d in devices)


def test_rpc_gpu_names_the_cards_behind_live_workers_and_keeps_their_memory() -> None:
    live = parse_list_devices("  RPC0: 10.0.0.2:50052 (24135 MiB, 20000 MiB free)\n"
                              "  RPC1: 10.0.0.2:50052 (24135 MiB, 21000 MiB free)\n", "10.0.0.2:50052")
    named, notes = describe_remote_devices(live, parse_rpc_gpu_spec("rtx-3090@10.0.0.2"))
    assert named[0].name == "NVIDIA GeForce RTX 3090" and named[0].vram_free_bytes == 20000 * MiB
    assert named[0].compute_capability == (8, 6) and named[0].source == "rpc"
    assert named[1] == live[1] and notes and "RPC1[10.0.0.2:50052]" in notes[0] and "generic GPU" in notes[0]
    with pytest.raises(TunerError, match=r"10\.0\.0\.9:50052, which --rpc does not"):
        describe_remote_devices(live, parse_rpc_gpu_spec("rtx-3090@10.0.0.9"))


def test_link_options_need_workers() -> None:
    with pytest.raises(TunerError, match="add --rpc or --rpc-gpu"):
        rpc_hardware(hardware_for("none"), rpc=None, rpc_gpu=None, link=NetworkLink(10.0))
    with pytest.raises(TunerError, match="more than 0"):
        NetworkLink(0.0)


# ------------------------------------------------------------------------------------------------ flags


def test_rpc_is_written_first_so_override_rules_can_name_rpc_buffers() -> None:
    flags = ServerFlags(rpc=("10.0.0.2:50052", "10.0.0.3:50052"), ctx_size=4096)
    args = flags.to_args()
    assert args[:2] == ["--rpc", "10.0.0.2:50052,10.0.0.3:50052"]
    # -ot is a planned flag (tuner.placement writes it): always after --rpc, whose buffer types it may name
    ot = flags.with_(override_tensor=("blk.1=RPC0[10.0.0.2:50052]",))
    ot_args = ot.to_args()
    assert ot_args[:2] == args[:2] and ot_args.index("--override-tensor") > ot_args.index("--rpc")
    assert flags_from_args([*args, "-ot", "blk.1=RPC0[10.0.0.2:50052]"])[0] == ot
    assert "--rpc" not in ServerFlags().to_args()


def test_a_plan_over_workers_carries_their_endpoints_in_its_command() -> None:
    plan = plan_for("qwen3.5-122b-a10b:Q4_K_M", _cluster(), Wishes(ctx_size=32768)).plan
    command = plan.command()
    assert command[3:5] == ["--rpc", "10.0.0.2:50052,10.0.0.3:50052,10.0.0.4:50052"]
    assert plan.flags.rpc == ("10.0.0.2:50052", "10.0.0.3:50052", "10.0.0.4:50052")


def test_bench_puts_the_workers_in_front_of_every_set_that_does_not_name_its_own() -> None:
    user = parse_set("a=-c 4096 -ot blk.1=CPU")
    own = parse_set("b=--rpc 10.0.0.9:1 -c 4096")
    sets = on_workers([user, own, defaults_set()], ("10.0.0.2:50052",))
    assert sets[0].args[:2] == ("--rpc", "10.0.0.2:50052") and sets[0].flags is not None
    assert sets[0].flags.rpc == ("10.0.0.2:50052",) and sets[0].args[2:] == user.args
    assert sets[1] == own
    assert sets[2].args[:2] == ("--rpc", "10.0.0.2:50052") and sets[2].flags is None
    assert on_workers([user], ()) == [user]


# ------------------------------------------------------------------------------------------------ the network


def test_traffic_per_token_matches_the_proxied_byte_counts(proxy_layout) -> None:  # type: ignore[no-untyped-def]
    """A protocol-parsing proxy between a CPU llama-server and two CPU workers counted, per generated token at
    n_kv 512: RPC0 6 SET_TENSOR of 3,968 B and 1 GET; RPC1 7 SET_TENSOR of 4,286 B and 1 GET whose reply was the
    logits; at n_kv 2048, RPC0's SETs grew to 7,040 B (the f16 mask, 2 bytes a cell)."""
    names = ["RPC0[127.0.0.1:50301]", "RPC0[127.0.0.1:50302]"]
    endpoints = {names[0]: "127.0.0.1:50301", names[1]: "127.0.0.1:50302"}
    flags = ServerFlags(rpc=tuple(endpoints.values()), ctx_size=4096, parallel=1, flash_attn="on")

    def traffic(n_kv: int):  # type: ignore[no-untyped-def]
        return rpc_traffic(proxy_layout, flags, names, [5, 4], endpoints, n_tok=1, n_kv=n_kv, new_graph=0)

    at_512, at_2048 = traffic(512), traffic(2048)
    gets = 2 * 321  # one GET_TENSOR request from each worker
    recompute = 2 * 13
    assert at_512.bytes_up == 3968 + 4286 + gets + recompute
    assert at_2048.bytes_up - at_512.bytes_up == 2 * (7040 - 3968), "both workers hold an attention layer"
    assert at_512.bytes_down == (8 + 4 * 256) + (8 + 4 * proxy_layout.n_vocab)
    assert at_512.round_trips == 2 and at_512.boundaries == 3
    assert SET_OVERHEAD_BYTES == 314


@pytest.mark.parametrize(("kinds", "back_to_host"), [
    ("(down)", 256 + 8),  # par [n_ff_exp 32, 2 used] f32 and the 2 selected experts' ids
    ("(up|down|gate|gate_up)", 1024 + 8),  # the normed input [n_embd 256] f32 and the ids
])
def test_traffic_of_an_rpc_layer_whose_experts_stay_on_the_head_matches_the_proxied_byte_counts(
        proxy_layout, kinds: str, back_to_host: int) -> None:  # type: ignore[no-untyped-def]
    """The same proxied run with ``-ot blk\\.(2)\\.ffn_<kinds>_(ch|)exps=CPU`` (block 2 on RPC0), against a no-op
    ``-ot`` (pipeline parallelism off in both), measured per generated token: RPC0 made 2 more GET_TENSORs, whose
    replies were ``back_to_host`` bytes (+ 8 B each) more, and 1 more SET_TENSOR of 2,048 B (the ``experts`` tensor
    [256, 2 used] f32, weighted and summed on RPC0); its graph, cut in two splits, went whole every token: 95,893 +
    141,349 B of GRAPH_COMPUTE instead of a 13 B GRAPH_RECOMPUTE."""
    names = ["RPC0[127.0.0.1:50301]", "RPC0[127.0.0.1:50302]"]
    endpoints = {names[0]: "127.0.0.1:50301", names[1]: "127.0.0.1:50302"}

    def traffic(rule: str):  # type: ignore[no-untyped-def]
        flags = ServerFlags(rpc=tuple(endpoints.values()), ctx_size=4096, parallel=1, flash_attn="on",
                            override_tensor=(rule,))
        return rpc_traffic(proxy_layout, flags, names, [5, 4], endpoints, n_tok=1, n_kv=512, new_graph=0)

    base = traffic(NO_PIPELINE_RULE)
    spilled = traffic(rf"blk\.(2)\.ffn_{kinds}_(ch|)exps=CPU")
    assert spilled.round_trips - base.round_trips == 2
    assert spilled.bytes_down - base.bytes_down == back_to_host + 2 * 8
    graph = spilled.bytes_up - base.bytes_up - (2 * 321 + SET_OVERHEAD_BYTES + 2048 - 13)
    assert graph == pytest.approx(95_893 + 141_349, rel=0.1)
    assert spilled.boundaries == base.boundaries + 2


def test_a_spilled_rpc_layer_moves_the_experts_output_back_per_token_and_per_ubatch(proxy_layout) -> None:  # type: ignore[no-untyped-def]
    """build_moe_ffn (src/llama-graph.cpp:2007-2360) on an RPC device with experts in the head's RAM: out go the
    tensors the host's matmuls read (the normed input or ``par``, and the ``selected_experts`` view of the argsort of
    all experts), back comes ``experts`` [n_embd, n_expert_used] f32 per token; an up/gate-only spill sends the
    matmul's output back instead, for the SwiGLU on the device."""
    e, x, f, n = proxy_layout.n_embd, proxy_layout.n_expert_used, proxy_layout.n_ff_exp, proxy_layout.n_expert
    for t in (1, 512):
        ids = 4 * x + (t - 1) * 4 * n
        assert moe_spill_transfers(proxy_layout, frozenset({"down"}), t) == ([4 * f * x * t, ids], [4 * e * x * t])
        assert moe_spill_transfers(proxy_layout, frozenset({"up", "gate", "down"}), t) == (
            [4 * e * t, ids], [4 * e * x * t])
        assert moe_spill_transfers(proxy_layout, frozenset({"gate"}), t) == ([4 * e * t, ids], [4 * f * x * t])
    # the 397B: 160 KiB back per token for every spilled layer, and a ubatch of 512 moves 512 times that
    big = plan_for("qwen3.5-397b-a17b:Q2_K", _cluster(), Wishes(ctx_size=32768)).plan.candidate.layout
    _, back = moe_spill_transfers(big, frozenset({"down"}), 1)
    assert back == [4 * 4096 * 10] == [160 * 1024]
    _, back_pp = moe_spill_transfers(big, frozenset({"down"}), 512)
    assert back_pp == [512 * 160 * 1024]


def test_op_offload_reads_the_selected_experts_once_more_from_the_worker(proxy_layout) -> None:  # type: ignore[no-untyped-def]
    """A ubatch of 32 or more with a local CUDA device: the expert copy reads the ids from their device before the
    split's own inputs are copied (ggml-backend.cpp:1714-1745): one more round trip per spilled RPC layer."""
    worker = {"RPC0[h:1]": "h:1"}
    flags = ServerFlags(ctx_size=4096, parallel=1, flash_attn="on",
                        override_tensor=(r"blk\.(2)\.ffn_(down)_(ch|)exps=CPU",))

    def trips(names: list[str], n_tok: int) -> float:
        return rpc_traffic(proxy_layout, flags, names, [5, 4], worker, n_tok=n_tok, n_kv=512, new_graph=0).round_trips

    with_cuda, with_cpu = ["RPC0[h:1]", "CUDA0"], ["RPC0[h:1]", "Vulkan0"]
    assert trips(with_cuda, 64) - trips(with_cpu, 64) == 1
    assert trips(with_cuda, 1) == trips(with_cpu, 1)


def test_the_network_term_is_part_of_the_prediction_and_shrinks_with_a_faster_link() -> None:
    hw = _cluster()
    plan = plan_for("qwen3.5-397b-a17b:Q2_K", hw, Wishes(ctx_size=32768)).plan
    layout, flags = plan.candidate.layout, plan.flags
    terms = speed.speed_terms(layout, flags, hw)
    assert terms.network is not None and terms.network.tg_s > 0 and terms.network.pp_s > 0
    assert speed.tg_parts(terms)[NETWORK_PART] == terms.network.tg_s
    pred = predict_on(layout, flags, hw)
    assert 1 / pred.tg_tok_s == pytest.approx(sum(speed.tg_parts(terms).values()))
    assert 1 / pred.pp_tok_s == pytest.approx(sum(speed.pp_parts(terms).values()))
    fast = predict_on(layout, flags, replace(hw, link=NetworkLink(10.0, 0.05e-3)))
    assert fast.network is not None and pred.network is not None and fast.network.tg_s < pred.network.tg_s
    assert fast.tg_tok_s > pred.tg_tok_s and fast.pp_tok_s > pred.pp_tok_s
    local_hw, local_flags = hardware_for("rtx-3090x8"), flags.with_(rpc=())
    assert predict_on(layout, local_flags, local_hw).network is None
    assert NETWORK_PART not in speed.tg_parts(speed.speed_terms(layout, local_flags, local_hw))


def test_op_offload_goes_to_the_first_local_gpu_never_to_a_worker() -> None:
    """Experts in RAM are copied, for ubatches of 32 tokens or more, to the first device that offloads ops: RPC
    devices have none (ggml-rpc.cpp:2262), so with workers first it is this machine's CUDA0, or none at all."""
    hw = _cluster()
    layout = plan_for("qwen3.5-397b-a17b:Q2_K", hw, Wishes(ctx_size=32768)).plan.candidate.layout
    flags = ServerFlags(rpc=rpc_endpoints(hw.gpus), ctx_size=32768, parallel=1, flash_attn="on", n_cpu_moe=4)
    names = [g.llama_name for g in hw.gpus]
    remote = {g.llama_name for g in hw.remote_gpus}
    with_local = speed.roofline(layout, flags, names, None, remote=remote)
    assert with_local.pp_offload_bytes > 0 and "CUDA0" in with_local.pp_expert_flops
    only_workers = speed.roofline(layout, flags, names[:6], None, remote=remote)
    assert only_workers.pp_offload_bytes == 0


def test_logits_cross_the_network_when_the_output_layer_is_on_a_worker(proxy_layout) -> None:  # type: ignore[no-untyped-def]
    """The worker first (llama.cpp's order with a local GPU): the hidden state comes back once, the logits stay
    local. The worker last (a local GPU listed first, as --device can order them): the logits come back instead."""
    flags = ServerFlags(ctx_size=4096, parallel=1, flash_attn="on")
    worker = {"RPC0[h:1]": "h:1"}
    output_local = rpc_traffic(proxy_layout, flags, ["RPC0[h:1]", "CUDA0"], [5, 4], worker, n_tok=1, n_kv=512,
                               new_graph=0)
    output_remote = rpc_traffic(proxy_layout, flags, ["CUDA0", "RPC0[h:1]"], [5, 4], worker, n_tok=1, n_kv=512,
                                new_graph=0)
    assert output_local.bytes_down == 8 + 4 * proxy_layout.n_embd
    assert output_remote.bytes_down == 8 + 4 * proxy_layout.n_vocab


# ------------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize(("text", "line"), [
    ("…/ggml-rpc.cpp:547: Failed to connect to 10.0.0.2:50052\n",
     "RPC worker 10.0.0.2:50052 is unreachable: nothing accepted the connection"),
    ("E RPC server version mismatch: 6.0.0\n…/ggml-rpc.cpp:550: RPC handshake failed for 10.0.0.2:50052\n",
     "RPC worker 10.0.0.2:50052 runs RPC protocol 6.0.0, which this llama-server does not speak"),
    ("…/ggml-rpc.cpp:550: RPC handshake failed for 10.0.0.2:50052\n",
     "RPC worker 10.0.0.2:50052 failed the handshake"),
    ("Cannot resolve host 'nowhere'\n…/ggml-rpc.cpp:547: Failed to connect to nowhere:1\n",
     "RPC worker nowhere:1 is unreachable"),
    ("main: loading model\nload_tensors: …\n…/ggml-rpc.cpp:566: Remote RPC server crashed or returned malformed "
     "response\n", "an RPC worker stopped answering (it crashed or was stopped, or the network dropped)"),
    ("…/ggml-rpc.cpp:354: Remote RPC server crashed or returned malformed response\n",
     "an RPC worker closed the connection during the handshake"),
    ("error while handling argument \"--rpc\": RPC not supported in this build\n",
     "this llama-server was built without RPC (GGML_RPC=ON)"),
])
def test_llama_cpps_rpc_failures_are_one_line_each(text: str, line: str) -> None:
    said = rpc_failure(text)
    assert said is not None and said.startswith(line) and "\n" not in said


def test_a_log_without_rpc_trouble_says_nothing() -> None:
    assert rpc_failure("load_tensors: CPU model buffer size = 1.00 MiB\nerror loading model: bad\n") is None


@pytest.fixture
def v6_worker() -> Iterator[str]:
    with other_protocol_worker((6, 0, 0)) as endpoint:
        yield endpoint


def test_the_protocol_a_worker_speaks_is_read_from_its_handshake(v6_worker: str) -> None:
    assert worker_protocol(v6_worker) == "6.0.0"


def test_an_unreachable_worker_is_one_line_before_anything_runs() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(TunerError, match=rf"RPC worker 127.0.0.1:{port} is unreachable: the connection was "
                                             rf"refused") as err:
            probe_endpoint(f"127.0.0.1:{port}")
    assert f"tuner worker --port {port}" in err.value.one_line()


# ------------------------------------------------------------------------------------------------ per machine


def test_memory_per_machine_sums_each_workers_devices_and_this_machines_gpus_and_ram() -> None:
    hw = _cluster()
    plan = plan_for("qwen3.5-122b-a10b:Q4_K_M", hw, Wishes(ctx_size=32768)).plan
    hosts = memory_by_host(plan.estimate, hw)
    assert [h.host for h in hosts] == ["10.0.0.2", "10.0.0.3", "10.0.0.4", HEAD, HEAD]
    for h, endpoint in zip(hosts[:3], ("10.0.0.2:50052", "10.0.0.3:50052", "10.0.0.4:50052"), strict=True):
        assert h.endpoints == (endpoint,) and h.free_bytes == 2 * 24 * 1024**3
        assert h.planned_bytes == sum(plan.estimate.device(d).total_bytes for d in h.devices) > 0
    assert hosts[3].devices == ("CUDA0", "CUDA1") and hosts[4].planned_bytes == plan.estimate.host_total_bytes
    assert sum(h.planned_bytes for h in hosts) == plan.estimate.total_bytes + plan.estimate.checkpoints_bytes + \
        plan.estimate.prompt_cache_bytes
    assert memory_by_host(plan.estimate, hardware_for("rtx-3090x2")) == []


def test_the_397b_on_four_hosts_of_two_3090s_is_planned_with_the_network_in_its_speed(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11's cluster: this machine with 2 × RTX 3090 and three workers with 2 × RTX 3090 each."""
    assert main(["recommend", "qwen3.5-397b-a17b", "--gpu", "rtx-3090x2", "--rpc-gpu", CLUSTER, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    plan, budget = result["plan"], result["budget"]
    assert result["command"][3:5] == ["--rpc", "10.0.0.2:50052,10.0.0.3:50052,10.0.0.4:50052"]
    names = [g["name"] for g in budget["gpus"]]
    assert len(names) == 8 and names[:2] == ["RPC0[10.0.0.2:50052]", "RPC1[10.0.0.2:50052]"]
    assert all(result["headroom_bytes"][n] >= 0 for n in [*names, "CPU"]), result["headroom_bytes"]
    used = {d["name"]: d["total_bytes"] for d in result["memory"]["devices"]}
    assert all(used[n] > 10 * 1024**3 for n in names), "every device holds a share of the 397B"
    hosts = result["hosts"]
    assert [h["host"] for h in hosts][:3] == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    net = result["predicted"]["network"]
    assert net["tg_ms_per_token"] > 0 and net["tg_per_token"]["round_trips"] >= 6
    assert net["link"] == {"gbit_s": 1.0, "rtt_ms": 0.2, "payload_bytes_s": 117500000}
    assert 0 < result["predicted"]["tg_tok_s"] < 1000 / net["tg_ms_per_token"]
    assert plan["quant"] and plan["ctx_per_slot"] >= 32768

    assert main(["recommend", "qwen3.5-397b-a17b", "--gpu", "rtx-3090x2", "--rpc-gpu", CLUSTER, "--quant",
                 plan["quant"], "--link-gbit", "10", "--link-rtt-ms", "0.05", "--json"]) == 0
    faster = json.loads(capsys.readouterr().out)
    assert faster["predicted"]["network"]["tg_ms_per_token"] < net["tg_ms_per_token"]
    assert faster["predicted"]["tg_tok_s"] > result["predicted"]["tg_tok_s"]


def test_spills_go_to_this_machines_gpus_before_the_workers_when_that_costs_no_context_or_spill() -> None:
    """A spilled layer on a worker costs network time per token (the experts' input goes back to it), one on a local
    GPU none: among the placements with the fewest expert tensors in RAM and the most room for context, the search
    takes the one with the fewest on workers. The 397B at Q4_K_M and 32768 tokens on four 2 x RTX 3090 hosts has such
    a choice (found by comparing the search with and without the tie-break)."""
    hw = _cluster()
    devices = devices_of(hw)
    budgets = [g.vram_free_bytes - DEFAULT_VRAM_BUFFER_BYTES for g in hw.gpus]
    layout = resolve_candidates("qwen3.5-397b-a17b:Q4_K_M")[0].layout
    local_first, plain = Placer(devices, budgets), Placer(devices, budgets, local_spills_first=False)

    def flags_at(ctx: int) -> ServerFlags:
        return ServerFlags(rpc=rpc_endpoints(hw.gpus), ctx_size=ctx, parallel=1, batch_size=2048, ubatch_size=512,
                           flash_attn="on")

    def on_workers(p: Placement) -> int:
        return sum(len(ts) for ts, d in zip(p.spilled, devices, strict=True) if d.remote)

    got, before = local_first.place(layout, flags_at(32768)), plain.place(layout, flags_at(32768))
    assert got is not None and before is not None
    assert got.n_spilled == before.n_spilled > 0, "the same number of expert tensors in RAM"
    assert got.secondary == before.secondary, "the same room for context on the tightest device"
    assert on_workers(got) < on_workers(before), (got.counts, before.counts)
    assert got.n_spilled - on_workers(got) > before.n_spilled - on_workers(before), "the rest on this machine's GPUs"
    assert all(got.estimate.device(d.name).total_bytes <= b for d, b in zip(devices, budgets, strict=True))
    assert local_first.place(layout, flags_at(32768), max_spills=got.n_spilled - 1, allow_partial=False) is None
    net_got, net_before = predict_on(layout, got.flags, hw).network, predict_on(layout, before.flags, hw).network
    assert net_got is not None and net_before is not None and net_got.tg_s < net_before.tg_s

    def largest_ctx(placer: Placer) -> int:  # with no more expert tensors in RAM, in steps of 256
        lo, hi = 32768 // 256, 262144 // 256 + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            fits = placer.place(layout, flags_at(mid * 256), max_spills=got.n_spilled, allow_partial=False)
            lo, hi = (mid, hi) if fits is not None else (lo, mid)
        return lo * 256

    assert largest_ctx(local_first) == largest_ctx(plain), "the tie-break costs no context"


def test_the_estimate_over_workers_names_devices_as_llama_cpp_logs_them() -> None:
    hw = _cluster()
    flags = ServerFlags(rpc=rpc_endpoints(hw.gpus), ctx_size=8192, parallel=1, flash_attn="on")
    plan = plan_for("qwen3.5-122b-a10b:Q4_K_M", hw, Wishes(ctx_size=8192)).plan
    est = estimate_on(plan.candidate.layout, flags, hw)
    assert [d.name for d in est.devices][:3] == ["RPC0[10.0.0.2:50052]", "RPC1[10.0.0.2:50052]",
                                                 "RPC0[10.0.0.3:50052]"]
    assert est.device("CUDA1").weights_bytes > 0 and est.device("CPU").output_bytes > 0
    assert all(v >= 0 for v in headroom_bytes(plan.estimate, plan.budget).values())


def test_recommend_refuses_link_options_without_workers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--gpu", "rtx-4090", "--link-gbit", "10"]) == 1
    assert "add --rpc or --rpc-gpu" in capsys.readouterr().err


def test_estimate_over_what_if_workers_writes_rpc_and_names_their_devices(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "qwen3.5-122b-a10b:Q4_K_M", "-c", "16384", "-np", "1", "--gpu", "none", "--rpc-gpu",
                 "rtx-4090x2@10.0.0.2,rtx-3090@10.0.0.3:50060", "--link-gbit", "2.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["flags"][:2] == ["--rpc", "10.0.0.2:50052,10.0.0.3:50060"]
    assert [d["name"] for d in result["memory"]["devices"]] == [
        "RPC0[10.0.0.2:50052]", "RPC1[10.0.0.2:50052]", "RPC0[10.0.0.3:50060]", "CPU"]
    assert result["predicted"]["network"]["link"]["gbit_s"] == 2.5
    assert result["predicted"]["network"]["tg_per_token"]["bytes_down"] > 4 * 248320, "the output is on a worker"


def test_hardware_lists_what_if_workers_first(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["hardware", "--gpu", "none", "--rpc-gpu", "rtx-4090@10.0.0.7", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(g["name"], g["endpoint"]) for g in result["gpus"]] == [("RPC0[10.0.0.7:50052]", "10.0.0.7:50052")]
    assert result["network"]["gbit_s"] == 1.0
