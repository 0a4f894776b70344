"""Devices on other machines: llama.cpp's RPC backend puts them in the device list, and a network link between them.

* An endpoint is ``host:port`` as llama.cpp's ``--rpc`` takes it: the host a name or an IPv4 address (the client
  resolves names with ``gethostbyname`` over ``AF_INET``, ggml/src/ggml-rpc/transport.cpp:742-762; the endpoint is
  split at its first ``:``, ggml-rpc.cpp:293-305, so IPv6 literals cannot be written), the port 1-65535
  (``ggml-rpc-server``'s default is 50052, tools/rpc/rpc-server.cpp).
* Device order: llama.cpp puts the RPC devices first, in ``--rpc`` order and each worker's devices in its own order,
  then the GPUs of this machine (src/llama.cpp:275-285). :func:`with_remote_devices` puts them into
  :attr:`Hardware.gpus` the same way, so ``-ts`` and the estimate's layer split index the same list.
* ``--rpc-gpu rtx-3090x2@10.0.0.2,rtx-4090@10.0.0.3:50053`` (:func:`parse_rpc_gpu_spec`) plans for workers that are
  not running (or not built) yet: catalog cards, all their memory free, at the endpoints given.
* :class:`NetworkLink`: the link's line rate and round-trip time, which :mod:`tuner.speed`'s network term uses.

Everything here returns data; nothing prints or exits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from tuner.errors import TunerError
from tuner.hardware.catalog import CatalogGpu, load_gpu_catalog, parse_gpu_spec
from tuner.hardware.gpu import Gpu

DEFAULT_RPC_PORT = 50052
"""``ggml-rpc-server``'s port when none is given (tools/rpc/rpc-server.cpp: ``int port = 50052``)."""

TCP_GOODPUT = 0.94
"""Share of an Ethernet link's line rate that carries TCP payload at a 1500-byte MTU: 1448 payload bytes in every
1538 on the wire (Ethernet preamble, header, FCS and gap; IPv4 and TCP headers with timestamps)."""

_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


@dataclass(frozen=True)
class NetworkLink:
    """The link between the machine running llama-server and its RPC workers (one switch, every worker alike)."""

    gbit_s: float = 1.0
    """Line rate in Gbit/s (10^9 bit/s)."""
    rtt_s: float = 0.2e-3
    """Round-trip time of one small message, seconds (``ping``: about 0.1-0.3 ms on a switched LAN)."""

    def __post_init__(self) -> None:
        if not self.gbit_s > 0:
            raise TunerError(f"the link's bandwidth must be more than 0 Gbit/s, got {self.gbit_s:g}")
        if self.rtt_s < 0:
            raise TunerError(f"the link's round-trip time must not be negative, got {self.rtt_s * 1e3:g} ms")

    @property
    def payload_bytes_s(self) -> float:
        """Bytes of payload per second: the line rate at :data:`TCP_GOODPUT`."""
        return self.gbit_s * 1e9 / 8 * TCP_GOODPUT

    def describe(self) -> str:
        return (f"{self.gbit_s:g} Gbit/s ({self.payload_bytes_s / 1e6:.0f} MB/s of payload), "
                f"{self.rtt_s * 1e3:g} ms round trip")

    def to_dict(self) -> dict[str, float]:
        return {"gbit_s": self.gbit_s, "rtt_ms": self.rtt_s * 1e3, "payload_bytes_s": round(self.payload_bytes_s)}


DEFAULT_LINK = NetworkLink()
"""Assumed when nothing is said: gigabit Ethernet (the common home and office LAN) with a 0.2 ms round trip."""


def parse_endpoint(text: str, *, default_port: int | None = None) -> str:
    """``host:port`` as llama.cpp's ``--rpc`` reads it, checked: a host name or IPv4 address, a port 1-65535
    (``default_port`` when the text has none and one is allowed)."""
    raw = text.strip()
    host, sep, port_text = raw.partition(":")
    if not sep:
        if default_port is None:
            raise TunerError(f"RPC endpoint {raw!r} needs a port: HOST:PORT, e.g. 192.168.1.20:{DEFAULT_RPC_PORT}")
        port_text = str(default_port)
    if ":" in port_text or raw.startswith("["):
        raise TunerError(f"RPC endpoint {raw!r}: llama.cpp's RPC connects over IPv4 only (HOST:PORT, one colon)")
    if not _HOST_RE.match(host):
        raise TunerError(f"RPC endpoint {raw!r}: {host!r} is not a host name or IPv4 address")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TunerError(f"RPC endpoint {raw!r}: the port must be a number from 1 to 65535")
    return f"{host}:{int(port_text)}"


def parse_endpoints(text: str) -> tuple[str, ...]:
    """``--rpc`` 's value: endpoints separated by commas, each once, in the order llama.cpp will number them."""
    endpoints = tuple(parse_endpoint(part) for part in text.split(",") if part.strip())
    if not endpoints:
        raise TunerError("--rpc needs at least one HOST:PORT")
    _no_repeats(endpoints)
    return endpoints


def _no_repeats(endpoints: Sequence[str]) -> None:
    seen: set[str] = set()
    for e in endpoints:
        if e in seen:
            raise TunerError(f"RPC endpoint {e} is named twice; two workers on one machine need two ports")
        seen.add(e)


def parse_rpc_gpu_spec(text: str, catalog: Mapping[str, CatalogGpu] | None = None) -> tuple[Gpu, ...]:
    """``--rpc-gpu``: ``CARD[xN]@HOST[:PORT]`` entries separated by commas, e.g. ``rtx-3090x2@10.0.0.2,rtx-4090@
    10.0.0.3:50053``: a worker at each endpoint (port 50052 when none is given) with N catalog cards, all their memory
    free, in llama.cpp's device order (the workers in the order given, each worker's cards numbered from 0)."""
    catalog = load_gpu_catalog() if catalog is None else catalog
    devices: list[Gpu] = []
    endpoints: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        card_text, at, where = part.rpartition("@")
        if not at or not card_text.strip() or not where.strip():
            raise TunerError(f"--rpc-gpu {part!r}: write CARD[xN]@HOST[:PORT], e.g. rtx-3090x2@192.168.1.20")
        endpoint = parse_endpoint(where, default_port=DEFAULT_RPC_PORT)
        entry, count = parse_gpu_spec(card_text.strip(), catalog)
        endpoints.append(endpoint)
        devices += [replace(entry.to_gpu(i), endpoint=endpoint) for i in range(count)]
    if not devices:
        raise TunerError("--rpc-gpu needs at least one CARD[xN]@HOST[:PORT]")
    _no_repeats(endpoints)
    return tuple(devices)


def rpc_endpoints(gpus: Sequence[Gpu]) -> tuple[str, ...]:
    """The endpoints of the remote devices among ``gpus``, once each, in device order: ``--rpc`` 's value."""
    return tuple(dict.fromkeys(g.endpoint for g in gpus if g.endpoint is not None))
