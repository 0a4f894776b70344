"""llama-server's flags, one row each: the one place tuner spells an option, knows its default and who sets it.

A :class:`Flag` row holds a flag's key (the :class:`ServerFlags` field when tuner plans it), its long name and short
aliases, the kind of value it takes, llama-server's default (with the line of llama.cpp that sets it, paths relative
to llama.cpp's tree), and its role: tuner plans it (``planned``), ``tuner serve`` sets it itself on every launch
(``serve_owned``), a bench flag set may not carry it (``bench_forbidden``), or it moves weights between devices
(``placement``, which llama-server's ``--fit`` then leaves alone). Derived from :data:`FLAGS`:

* :class:`ServerFlags` (its defaults), :meth:`ServerFlags.to_args` and :meth:`ServerFlags.from_values`;
* :func:`scan` and :func:`flags_from_args`: a pasted llama-server command line read back;
* the typer options of ``tuner/cli/_options.py`` (a test holds them to this table), serve's owned flags, bench's
  forbidden and placement sets.

Adding a flag is one row (and, when tuner plans it, one :class:`ServerFlags` field read from the row), e.g.::

    Flag("tensor_split", "--tensor-split", ("-ts",), Kind.FLOAT, (), "common/arg.cpp:2831",
         "Fraction of the model on each GPU, e.g. 3,1.", list_sep=",", planned=True, placement=True)
    tensor_split: tuple[float, ...] = _default("tensor_split")        # in ServerFlags

A list-valued flag (``--tensor-split 3,1``, ``--rpc host:port,...``, ``--device``) sets ``list_sep`` and holds a
tuple; a repeatable one (``--override-tensor`` given twice) sets ``repeat`` and its occurrences accumulate;
a switch pair (``--kv-unified`` / ``--no-kv-unified``) names its negation.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from tuner.errors import TunerError
from tuner.ggml import KV_CACHE_TYPES, kv_cache_type
from tuner.untrusted import shown

SPEC_MTP = "draft-mtp"
FLASH_ATTN_MODES = ("on", "off", "auto")
#: --split-mode's values (common/arg.cpp:2807-2826); tuner sizes layer and none (tuner.devices refuses the others).
SPLIT_MODES = ("none", "layer", "row", "tensor")
#: -ts takes fewer values than llama_max_devices() = 16 (common/arg.cpp:2841-2845, src/llama.cpp:86-88).
MAX_TENSOR_SPLIT = 15
FLOAT32_MAX = 3.4028234663852886e38  # FLT_MAX: -ts shares are C floats
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38  # FLT_MIN: std::stof throws out_of_range below it (glibc's ERANGE)
#: the slots llama-server gives ``-np -1`` (auto), with one unified KV pool (tools/server/server.cpp:156-160).
AUTO_SLOTS = 4
INT32_MAX = (1 << 31) - 1  # llama-server's integer flags are C ints
MAX_SEQ = 256  # LLAMA_MAX_SEQ (src/llama-cparams.h:8): more sequences are refused (src/llama-context.cpp:101)
#: values llama.cpp reads as "on" for on/off options such as --fit (common_arg_utils::is_truthy, common/arg.cpp:1334).
TRUTHY = ("on", "enabled", "true", "1")
#: -ngl words meaning every layer: auto (-1) and all (-2; <= -2 is all) (common/arg.cpp:2789-2797, common.h:475).
_ALL_LAYERS = ("all", "auto", "-1", "-2")


def _float32(value: float) -> float:
    """``value`` rounded to a C float, as ``std::stof`` stores it; OverflowError past float32's range."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _check_float32_shares(shares: Sequence[float]) -> None:
    """-ts shares as llama.cpp reads them: each with ``std::stof`` (common/arg.cpp:2847), which throws out_of_range
    past float32's range (above ~3.4028235e38, or nonzero below its smallest normal ~1.1754944e-38), then summed in
    float (src/llama-model.cpp:1580-1587), where an infinite sum turns every split point into NaN."""
    total = 0.0
    for v in shares:
        try:
            if 0 < v < FLOAT32_MIN_NORMAL:
                raise OverflowError
            share = _float32(v)
        except OverflowError:
            raise TunerError(f"{_opt('tensor_split')}: the share {v:.8g} is out of range (llama.cpp reads each as "
                             f"a C float: 0, or {FLOAT32_MIN_NORMAL:.8g} to {FLOAT32_MAX:.8g})") from None
        try:
            total = _float32(total + share)
        except OverflowError:
            raise TunerError(f"{_opt('tensor_split')}: the shares add up past {FLOAT32_MAX:.8g}, the largest C float "
                             "(llama.cpp sums them as one)") from None


class Kind(enum.Enum):
    """What a flag's value is. A switch takes none; ``LAYERS`` is a count or all/auto (held as None)."""

    INT = "int"
    FLOAT = "float"
    TEXT = "text"
    CHOICE = "choice"
    LAYERS = "layers"
    SWITCH = "switch"


@dataclass(frozen=True)
class Flag:
    """One llama-server flag (see the module doc)."""

    key: str  # the ServerFlags field when planned, else the name other modules ask for (threads, fit, model)
    long: str
    aliases: tuple[str, ...]
    kind: Kind
    default: Any  # llama-server's default, as tuner holds the value (None: llama-server decides / nothing)
    source: str  # where llama.cpp defines the flag or its default (path:line in its tree)
    help: str
    choices: tuple[str, ...] = ()
    negation: tuple[str, ...] = ()  # a switch's off spellings, long first: ("--no-kv-unified", "-no-kvu")
    bare: str | None = None  # the value when given without one (the old bare -fa)
    legacy: tuple[str, ...] = ()  # spellings older llama.cpp releases took: read, never offered
    list_sep: str | None = None  # a list in one value: "3,1" -> (3.0, 1.0)
    repeat: bool = False  # occurrences accumulate (-ot a=CPU -ot b=CPU)
    planned: bool = False  # a ServerFlags field
    explicit: bool = False  # to_args writes it even at its default, so a plan's command line reads complete
    needs: str | None = None  # to_args writes it only when this other flag is off its default
    yields_to: str | None = None  # to_args leaves it out when this other flag is off its default
    serve_owned: bool = False
    bench_forbidden: bool = False
    placement: bool = False

    @property
    def takes_value(self) -> bool:
        return self.kind is not Kind.SWITCH

    @property
    def names(self) -> tuple[str, ...]:
        """The spellings that turn it on or give it a value: long name first."""
        return (self.long, *self.aliases)

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every spelling llama-server reads for it, negations and legacy ones included."""
        return (*self.names, *self.negation, *self.legacy)

    @property
    def metavar(self) -> str | None:
        """The choices as a usage line shows them (``[on|off|auto]``), when they are few enough to read there."""
        shown = f"[{'|'.join(self.choices)}]"
        return shown if self.kind is Kind.CHOICE and len(shown) <= 24 else None

    # ------------------------------------------------------------------------------------------------ values

    def _item(self, raw: str, option: str) -> Any:
        if self.kind is Kind.INT:
            try:
                return int(raw)
            except ValueError:
                raise TunerError(f"{option} needs a number, got {raw!r}") from None
        if self.kind is Kind.FLOAT:
            try:
                return float(raw)
            except ValueError:
                raise TunerError(f"{option} needs numbers, got {raw!r}") from None
        if self.kind is Kind.LAYERS:
            if raw.strip().lower() in _ALL_LAYERS:
                return None
            try:
                value = int(raw)
            except ValueError:
                raise TunerError(f"{option} must be a number, 'all' or 'auto', got {raw!r}") from None
            if value < 0:
                raise TunerError(f"{option} must not be negative, got {value}")
            return value
        if self.kind is Kind.CHOICE:
            return raw.lower()
        return raw

    def parse(self, raw: str, option: str | None = None) -> Any:
        """The value of one occurrence from its text (``option``: as the user typed it, for errors)."""
        option = option or self.long
        if self.kind is Kind.SWITCH:
            raise TunerError(f"internal: {option} takes no value")
        if self.list_sep is not None:
            return tuple(self._item(part.strip(), option) for part in raw.split(self.list_sep) if part.strip())
        value = self._item(raw, option)
        return (value,) if self.repeat else value

    def read(self, value: Any) -> Any:
        """A value from a typed option (typer's): text is parsed as on a command line, the rest kept. A list row
        reads None as its default and a repeated option's values (typer gives a list) one after the other."""
        is_list = self.list_sep is not None or self.repeat
        if is_list and value is None:
            return self.default
        if is_list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(item for v in value for item in self.parse(v))
        if isinstance(value, str) and (self.kind is not Kind.TEXT or is_list):
            return self.parse(value)
        return value

    def _text(self, item: Any) -> str:
        if self.kind is Kind.LAYERS:
            return "all" if item is None or item < 0 else str(item)
        if self.kind is Kind.FLOAT:
            return f"{item:g}"
        return str(item)

    def format(self, value: Any) -> str:
        """One value as llama-server reads it (a list joined by its separator)."""
        if self.list_sep is not None:
            return self.list_sep.join(self._text(v) for v in value)
        return self._text(value)

    def to_args(self, value: Any) -> list[str]:
        """The arguments that give llama-server ``value``: ``--long VALUE``, a switch's on or off spelling (nothing
        for None), one occurrence per item of a repeatable flag without a list separator."""
        if self.kind is Kind.SWITCH:
            if value is None or (not value and not self.negation):
                return []
            return [self.long if value else self.negation[0]]
        if self.repeat and self.list_sep is None:
            return [arg for item in value for arg in (self.long, self._text(item))]
        return [self.long, self.format(value)]


class FlagTable:
    """The rows, by key and by every spelling."""

    def __init__(self, rows: Iterable[Flag]) -> None:
        self.rows: tuple[Flag, ...] = tuple(rows)
        self._by_key: dict[str, Flag] = {}
        self._by_spelling: dict[str, Flag] = {}
        for row in self.rows:
            if row.key in self._by_key:
                raise ValueError(f"two flag rows have the key {row.key!r}")
            self._by_key[row.key] = row
            for name in row.spellings:
                if name in self._by_spelling:
                    raise ValueError(f"{name} is spelled by two flag rows")
                self._by_spelling[name] = row

    def __getitem__(self, key: str) -> Flag:
        return self._by_key[key]

    def __iter__(self) -> Iterator[Flag]:
        return iter(self.rows)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def lookup(self, option: str) -> Flag | None:
        """The row spelled ``option`` (``-c``, ``--ctx-size``, ``--no-kv-unified`` …), or None."""
        return self._by_spelling.get(option)

    def spellings(self, keep: Callable[[Flag], bool]) -> tuple[str, ...]:
        """Every spelling of the rows ``keep`` selects."""
        return tuple(name for row in self.rows if keep(row) for name in row.spellings)

    @property
    def planned(self) -> tuple[Flag, ...]:
        return tuple(row for row in self.rows if row.planned)


_H, _A = "common/common.h", "common/arg.cpp"

#: Every llama-server flag tuner knows. The planned rows are in the order :meth:`ServerFlags.to_args` writes them.
FLAGS = FlagTable((
    # ------------------------------------------------------------------ planned: ServerFlags fields
    # first: RPC devices are registered while arguments are parsed, in argv order (common/arg.cpp:2679-2689), and
    # -ot can name their buffers only after that (an -ot before --rpc fails with "unknown buffer type")
    Flag("rpc", "--rpc", (), Kind.TEXT, (), f"{_A}:2680",
         "RPC workers (ggml-rpc-server), HOST:PORT,...: their devices come first, in this order.", list_sep=",",
         planned=True),
    Flag("ctx_size", "--ctx-size", ("-c",), Kind.INT, 0, f"{_H}:452", "Context size (0 = the model's).",
         planned=True, explicit=True),
    Flag("parallel", "--parallel", ("-np",), Kind.INT, -1, f"{_A}:1403",
         f"Slots (-1 = llama-server's auto: {AUTO_SLOTS}, unified).", planned=True),
    # None: llama-server decides, unified exactly when -np is auto (common.h:575, tools/server/server.cpp:156-160)
    Flag("kv_unified", "--kv-unified", ("-kvu",), Kind.SWITCH, None, f"{_A}:1724",
         "One KV pool shared by all slots.", negation=("--no-kv-unified", "-no-kvu"), planned=True,
         needs="parallel"),
    Flag("cache_type_k", "--cache-type-k", ("-ctk",), Kind.CHOICE, "f16", f"{_H}:589", "K cache type.",
         choices=KV_CACHE_TYPES, planned=True, explicit=True),
    Flag("cache_type_v", "--cache-type-v", ("-ctv",), Kind.CHOICE, "f16", f"{_H}:590", "V cache type.",
         choices=KV_CACHE_TYPES, planned=True, explicit=True),
    Flag("batch_size", "--batch-size", ("-b",), Kind.INT, 2048, f"{_H}:453", "Logical batch size.",
         planned=True, explicit=True),
    Flag("ubatch_size", "--ubatch-size", ("-ub",), Kind.INT, 512, f"{_H}:454", "Physical batch size.",
         planned=True, explicit=True),
    Flag("flash_attn", "--flash-attn", ("-fa",), Kind.CHOICE, "auto", f"{_H}:501", "Flash attention.",
         choices=FLASH_ATTN_MODES, bare="on", planned=True, explicit=True),
    # None = every layer: llama.cpp's default is auto (-1, common.h:475), which tuner sizes as all
    Flag("n_gpu_layers", "--n-gpu-layers", ("-ngl", "--gpu-layers"), Kind.LAYERS, None, f"{_H}:475",
         "Layers on the GPU: a number, 'all' or 'auto'.", planned=True, explicit=True, placement=True),
    Flag("n_cpu_moe", "--n-cpu-moe", ("-ncmoe",), Kind.INT, 0, f"{_A}:2767",
         "Keep the experts of the first N layers on the CPU.", planned=True, yields_to="cpu_moe", placement=True),
    Flag("cpu_moe", "--cpu-moe", ("-cmoe",), Kind.SWITCH, False, f"{_A}:2760", "Keep all expert tensors on the CPU.",
         planned=True, placement=True),
    # several devices: which ones, how layers split over them, which tensors go elsewhere (tuner.placement plans them)
    Flag("split_mode", "--split-mode", ("-sm",), Kind.CHOICE, "layer", f"{_A}:2807",
         "How to split the model over several devices: layer or none (row and tensor are not sized).",
         choices=SPLIT_MODES, planned=True, placement=True),
    Flag("main_gpu", "--main-gpu", ("-mg",), Kind.INT, 0, f"{_A}:2858",
         "The device (index) that holds the model with --split-mode none.", planned=True, placement=True),
    Flag("device", "--device", ("-dev",), Kind.TEXT, (), f"{_A}:2738",
         "Devices to offload to, in this order (CUDA0,CUDA1; none = no offload).", list_sep=",", planned=True,
         placement=True),
    Flag("tensor_split", "--tensor-split", ("-ts",), Kind.FLOAT, (), f"{_A}:2831",
         "Share of the layers on each device, e.g. 20,21 (layer counts) or 3,1.", list_sep=",", planned=True,
         placement=True),
    Flag("override_tensor", "--override-tensor", ("-ot",), Kind.TEXT, (), f"{_A}:2754",
         "Tensor buffer overrides: PATTERN=BUFFER_TYPE,... (first match wins).", list_sep=",", repeat=True,
         planned=True, placement=True),
    Flag("cache_ram_mib", "--cache-ram", ("-cram",), Kind.INT, 8192, f"{_H}:634",
         "Prompt cache limit in MiB (0 = off).", planned=True),
    Flag("ctx_checkpoints", "--ctx-checkpoints", ("-ctxcp", "--swa-checkpoints"), Kind.INT, 32, f"{_H}:631",
         "Context checkpoints per slot (hybrid models).", planned=True),
    Flag("spec_type", "--spec-type", (), Kind.TEXT, None, f"{_H}:373", f"Speculative decoding: {SPEC_MTP}.",
         planned=True),
    # --draft, --draft-n and --draft-max are removed in this llama.cpp (arg.cpp:4387); read from older command lines
    Flag("spec_draft_n_max", "--spec-draft-n-max", (), Kind.INT, 3, f"{_H}:328", "Tokens drafted per step.",
         legacy=("--draft-max", "--draft", "--draft-n"), planned=True, explicit=True, needs="spec_type"),
    Flag("no_kv_offload", "--no-kv-offload", ("-nkvo",), Kind.SWITCH, False, f"{_H}:580",
         "Keep KV and state on the CPU.", negation=("--kv-offload", "-kvo"), planned=True),
    # ------------------------------------------------------------------ passed through: bench and serve write them
    Flag("fit", "--fit", ("-fit",), Kind.TEXT, "on", f"{_H}:478",
         "Let llama-server shrink unset context and offload to the free memory (on or off)."),
    Flag("threads", "--threads", ("-t",), Kind.INT, None, f"{_H}:71", "CPU threads (default: physical cores)."),
    Flag("load_mode", "--load-mode", ("-lm",), Kind.CHOICE, "auto", f"{_A}:2691", "How the model file is loaded.",
         choices=("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")),
    # ------------------------------------------------------------------ set by tuner itself
    Flag("model", "--model", ("-m",), Kind.TEXT, None, f"{_A}:3035", "Model file.", serve_owned=True,
         bench_forbidden=True),
    Flag("model_url", "--model-url", ("-mu",), Kind.TEXT, None, f"{_A}:3044", "Model URL.", bench_forbidden=True),
    Flag("hf_repo", "--hf-repo", ("-hf", "-hfr"), Kind.TEXT, None, f"{_A}:3060", "Hugging Face repo.",
         bench_forbidden=True),
    Flag("host", "--host", (), Kind.TEXT, "127.0.0.1", f"{_H}:639", "Address to listen on.", serve_owned=True,
         bench_forbidden=True),
    Flag("port", "--port", (), Kind.INT, 8080, f"{_H}:622", "Port to listen on.", serve_owned=True,
         bench_forbidden=True),
    Flag("api_key", "--api-key", (), Kind.TEXT, None, f"{_A}:3492", "API keys.", serve_owned=True,
         bench_forbidden=True),
    Flag("api_key_file", "--api-key-file", (), Kind.TEXT, None, f"{_A}:3503", "API keys file.",
         bench_forbidden=True),
    Flag("path", "--path", (), Kind.TEXT, "", f"{_H}:636", "Static files to serve.", bench_forbidden=True),
    # a benchmark's fill-then-measure requests rely on the prompt cache (tuner/bench/measure.py)
    Flag("cache_prompt", "--cache-prompt", (), Kind.SWITCH, True, f"{_H}:629", "Reuse a slot's cached prompt.",
         negation=("--no-cache-prompt",), bench_forbidden=True),
    Flag("slots", "--slots", (), Kind.SWITCH, True, f"{_H}:673", "The /slots endpoint.", negation=("--no-slots",),
         bench_forbidden=True),
    Flag("verbosity", "--verbosity", ("-lv", "--log-verbosity"), Kind.INT, 3, f"{_H}:536", "Log verbosity.",
         serve_owned=True),
    Flag("verbose", "--verbose", ("-v", "--log-verbose"), Kind.SWITCH, False, f"{_A}:3924", "Log everything.",
         serve_owned=True),
    Flag("alias", "--alias", ("-a",), Kind.TEXT, None, f"{_A}:3011", "Model name clients see.", serve_owned=True),
    Flag("mmproj", "--mmproj", ("-mm",), Kind.TEXT, None, f"{_A}:2578", "Vision projector file.", serve_owned=True),
    Flag("mmproj_offload", "--mmproj-offload", (), Kind.SWITCH, True, f"{_A}:2601",
         "Vision projector on the GPU (--no-mmproj-offload: on the CPU).", negation=("--no-mmproj-offload",)),
    # the file is read verbatim at parse time; it replaces the GGUF's template and its tool_use variant
    # (common/arg.cpp:3762-3772, common/chat.cpp:757-786)
    Flag("chat_template_file", "--chat-template-file", (), Kind.TEXT, None, f"{_A}:3762",
         "Jinja chat template file instead of the GGUF's."),
    Flag("chat_template", "--chat-template", (), Kind.TEXT, None, f"{_A}:3750",
         "Jinja chat template (or a built-in name) instead of the GGUF's."),
    # an MTP sidecar (mtp-*.gguf) is loaded only through it (or -hf): nothing is looked up beside -m
    # (common/speculative.cpp:2537-2556)
    Flag("spec_draft_model", "--spec-draft-model", ("-md", "--model-draft"), Kind.TEXT, None, f"{_A}:4241",
         "Draft model file: the MTP sidecar (mtp-*.gguf) for --spec-type draft-mtp."),
    Flag("metrics", "--metrics", (), Kind.SWITCH, False, f"{_H}:675", "The /metrics endpoint.", serve_owned=True),
    Flag("jinja", "--jinja", (), Kind.SWITCH, True, f"{_H}:640", "The jinja chat template engine.",
         negation=("--no-jinja",), serve_owned=True),
    # with -hf llama-server also fetches and loads the repo's projector unless told not to (common/arg.cpp:400)
    Flag("mmproj_auto", "--mmproj-auto", (), Kind.SWITCH, True, f"{_A}:2593",
         "Load the repo's vision projector with -hf.", negation=("--no-mmproj", "--no-mmproj-auto")),
    Flag("list_devices", "--list-devices", (), Kind.SWITCH, False, f"{_A}:2746",
         "Print the devices llama-server sees (RPC workers' included) and exit."),
    Flag("fit_print", "--fit-print", ("-fitp",), Kind.TEXT, "off", f"{_A}:2882",
         "Print the memory llama.cpp's fitting estimates (llama-fit-params)."),
    # ------------------------------------------------------------------ sampling: a model card's preset (tuner.cards)
    Flag("temp", "--temp", ("--temperature",), Kind.FLOAT, 0.8, f"{_A}:2015", "Sampling temperature."),
    Flag("top_p", "--top-p", (), Kind.FLOAT, 0.95, f"{_A}:2032", "Top-p sampling (1 = off)."),
    Flag("top_k", "--top-k", (), Kind.INT, 40, f"{_A}:2024", "Top-k sampling (0 = off)."),
    Flag("min_p", "--min-p", (), Kind.FLOAT, 0.05, f"{_A}:2040", "Min-p sampling (0 = off)."),
    Flag("presence_penalty", "--presence-penalty", (), Kind.FLOAT, 0.0, f"{_A}:2104", "Presence penalty (0 = off)."),
    Flag("reasoning", "--reasoning", ("-rea",), Kind.CHOICE, "auto", f"{_A}:3690",
         "Thinking: on, off or auto (from the chat template).", choices=("on", "off", "auto")),
    # ------------------------------------------------------------------ YaRN: a context beyond the model's native one
    Flag("rope_scaling", "--rope-scaling", (), Kind.CHOICE, None, f"{_A}:2334", "RoPE scaling method.",
         choices=("none", "linear", "yarn")),
    Flag("rope_scale", "--rope-scale", (), Kind.FLOAT, None, f"{_A}:2344", "RoPE context scaling factor."),
    Flag("yarn_orig_ctx", "--yarn-orig-ctx", (), Kind.INT, 0, f"{_A}:2365", "YaRN: the model's original context."),
))


def _default(key: str) -> Any:
    return FLAGS[key].default


def _opt(key: str) -> str:
    return FLAGS[key].long


@dataclass(frozen=True)
class ServerFlags:
    """The llama-server flags tuner plans and sizes, by :data:`FLAGS` key. Defaults are llama-server's own."""

    rpc: tuple[str, ...] = _default("rpc")  # HOST:PORT of each RPC worker, in device order
    ctx_size: int = _default("ctx_size")  # 0 = the model's n_ctx_train
    parallel: int = _default("parallel")  # -1 = auto: AUTO_SLOTS slots and a unified cache
    kv_unified: bool | None = _default("kv_unified")
    cache_type_k: str = _default("cache_type_k")
    cache_type_v: str = _default("cache_type_v")
    batch_size: int = _default("batch_size")
    ubatch_size: int = _default("ubatch_size")
    flash_attn: str = _default("flash_attn")
    n_gpu_layers: int | None = _default("n_gpu_layers")  # None / negative = all
    n_cpu_moe: int = _default("n_cpu_moe")
    cpu_moe: bool = _default("cpu_moe")
    split_mode: str = _default("split_mode")
    main_gpu: int = _default("main_gpu")
    device: tuple[str, ...] = _default("device")
    tensor_split: tuple[float, ...] = _default("tensor_split")
    override_tensor: tuple[str, ...] = _default("override_tensor")  # PATTERN=BUFFER_TYPE, first match wins
    cache_ram_mib: int = _default("cache_ram_mib")
    ctx_checkpoints: int = _default("ctx_checkpoints")
    spec_type: str | None = _default("spec_type")
    spec_draft_n_max: int = _default("spec_draft_n_max")
    no_kv_offload: bool = _default("no_kv_offload")

    def __post_init__(self) -> None:
        if not isinstance(self.rpc, tuple):  # read back from JSON as a list
            object.__setattr__(self, "rpc", tuple(self.rpc))
        if not all(isinstance(e, str) and e for e in self.rpc):
            raise TunerError(f"{_opt('rpc')} takes HOST:PORT values, got {self.rpc!r}")
        for name in ("batch_size", "ubatch_size"):
            if getattr(self, name) <= 0:
                raise TunerError(f"{_opt(name)} must be positive, got {getattr(self, name)}")
        if self.ctx_size < 0:
            raise TunerError(f"{_opt('ctx_size')} must be 0 (the model's) or positive, got {self.ctx_size}")
        if self.parallel == 0 or self.parallel < -1:
            raise TunerError(f"{_opt('parallel')} must be positive (or -1 for auto), got {self.parallel}")
        if self.parallel > MAX_SEQ:
            raise TunerError(f"{_opt('parallel')} {self.parallel} is more slots than llama.cpp has ({MAX_SEQ})")
        if self.n_cpu_moe < 0:
            raise TunerError(f"{_opt('n_cpu_moe')} must be 0 or positive, got {self.n_cpu_moe}")
        if self.ctx_checkpoints < 0 or self.spec_draft_n_max < 0:
            raise TunerError(f"{_opt('ctx_checkpoints')} and {_opt('spec_draft_n_max')} must be 0 or positive")
        if self.cache_ram_mib < -1:
            raise TunerError(f"{_opt('cache_ram_mib')} must be -1 (no limit), 0 (off) or a size in MiB, "
                             f"got {self.cache_ram_mib}")
        fa = FLAGS["flash_attn"]
        if self.flash_attn not in fa.choices:
            raise TunerError(f"{fa.long} must be one of {', '.join(fa.choices)}; got {self.flash_attn!r}")
        if self.spec_type not in (None, SPEC_MTP):
            raise TunerError(f"{_opt('spec_type')} {self.spec_type!r} is not sized by tuner (supported: {SPEC_MTP})")
        kv_cache_type(self.cache_type_k)
        kv_cache_type(self.cache_type_v)
        for f in fields(self):  # llama-server reads every number with std::stoi (common/arg.cpp:793): an int32
            value = getattr(self, f.name)
            if type(value) is int and not -INT32_MAX <= value <= INT32_MAX:
                raise TunerError(f"{_opt(f.name)} {shown(value, 24)} is out of range (at most {INT32_MAX})")
        sm = FLAGS["split_mode"]
        if self.split_mode not in sm.choices:
            raise TunerError(f"{sm.long} must be one of {', '.join(sm.choices)}; got {self.split_mode!r}")
        if any(not 0 <= v < float('inf') for v in self.tensor_split) or len(self.tensor_split) > MAX_TENSOR_SPLIT:
            raise TunerError(f"{_opt('tensor_split')} takes at most {MAX_TENSOR_SPLIT} shares, none negative; "
                             f"got {FLAGS['tensor_split'].format(self.tensor_split)}")
        _check_float32_shares(self.tensor_split)
        for rule in self.override_tensor:
            pattern, eq, target = rule.partition("=")  # the first '=' (common/arg.cpp:265)
            if not eq or not pattern or not target:
                raise TunerError(f"{_opt('override_tensor')} takes PATTERN=BUFFER_TYPE rules, got {rule!r}")

    @property
    def n_seq(self) -> int:
        return AUTO_SLOTS if self.parallel == -1 else self.parallel

    @property
    def unified(self) -> bool:
        return True if self.parallel == -1 else bool(self.kv_unified)

    def with_(self, **changes: Any) -> ServerFlags:
        return replace(self, **changes)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], base: ServerFlags | None = None) -> ServerFlags:
        """A flag set from option values by key, as typer gives them (``n_gpu_layers="all"``, ``flash_attn="ON"``)."""
        return replace(base or cls(), **{key: FLAGS[key].read(value) for key, value in values.items()})

    def to_args(self) -> list[str]:
        """The llama-server arguments for this flag set: the ``explicit`` rows always (so a command line reads
        complete), the others when off llama-server's default, in the table's order."""
        args: list[str] = []
        for row in FLAGS.planned:
            value = getattr(self, row.key)
            if not row.explicit and value == row.default:
                continue
            if row.needs is not None and getattr(self, row.needs) == FLAGS[row.needs].default:
                continue
            if row.yields_to is not None and getattr(self, row.yields_to) != FLAGS[row.yields_to].default:
                continue
            args += row.to_args(value)
        return args


# --------------------------------------------------------------------------------------------- command lines


@dataclass(frozen=True)
class Occurrence:
    """One known flag in a command line: its row, the spelling used, its raw value (None for a switch, or a value
    flag at the end with none), whether it was a negation, and the tokens it took, as typed."""

    row: Flag
    option: str
    raw: str | None
    negated: bool
    tokens: tuple[str, ...]

    def value(self) -> Any:
        if self.row.kind is Kind.SWITCH:
            return not self.negated
        if self.raw is None:
            raise TunerError(f"{self.option} needs a value")
        return self.row.parse(self.raw, self.option)


def scan(args: Sequence[str], table: FlagTable = FLAGS) -> list[Occurrence | str]:
    """A llama-server command line, token by token: each flag ``table`` knows as an :class:`Occurrence` (with its
    value token; ``--opt=value`` is read like ``--opt value``), every other token as it is. A switch written with
    ``=`` is left as a token; a flag with ``bare`` given no value (the next token is an option) takes that value."""
    out: list[Occurrence | str] = []
    items = list(args)
    i = 0
    while i < len(items):
        token = items[i]
        opt, eq, inline = token.partition("=") if token.startswith("-") else (token, "", "")
        row = table.lookup(opt)
        if row is None or (eq and not row.takes_value):
            out.append(token)
        elif not row.takes_value:
            out.append(Occurrence(row, opt, None, opt in row.negation, (token,)))
        elif eq:
            out.append(Occurrence(row, opt, inline, False, (token,)))
        elif i + 1 >= len(items) or (row.bare is not None and items[i + 1].startswith("-")):
            out.append(Occurrence(row, opt, row.bare, False, (token,)))
        else:
            out.append(Occurrence(row, opt, items[i + 1], False, (token, items[i + 1])))
            i += 1
        i += 1
    return out


def values_from(found: Iterable[Occurrence | str], keep: Callable[[Flag], bool]) -> dict[str, Any]:
    """The values of the occurrences of the rows ``keep`` selects, by key: the last one wins, a repeatable row's
    accumulate."""
    values: dict[str, Any] = {}
    for occ in found:
        if isinstance(occ, Occurrence) and keep(occ.row):
            value = occ.value()
            values[occ.row.key] = (*values.get(occ.row.key, ()), *value) if occ.row.repeat else value
    return values


def flags_from_args(args: Sequence[str], base: ServerFlags | None = None) -> tuple[ServerFlags, list[str]]:
    """Map llama-server arguments onto :class:`ServerFlags`; return it and the tokens of everything else, as typed.

    ``-ctk X`` alone leaves V at its default, as llama-server does.
    """
    found = scan(args)
    extra = [t for occ in found
             for t in ((occ,) if isinstance(occ, str) else () if occ.row.planned else occ.tokens)]
    return ServerFlags.from_values(values_from(found, lambda row: row.planned), base), extra


def flag_value(args: Sequence[str], key: str) -> Any:
    """The value ``args`` give the flag ``key`` (its last occurrence), or its default when they do not name it."""
    return values_from(scan(args), lambda row: row.key == key).get(key, FLAGS[key].default)


def has_flag(args: Sequence[str], key: str) -> bool:
    """Whether ``args`` name the flag ``key`` in any spelling (a switch's negation included)."""
    return any(isinstance(occ, Occurrence) and occ.row.key == key for occ in scan(args))


def set_flag(args: Sequence[str], key: str, value: Any) -> list[str]:
    """``args`` with the flag ``key`` set to ``value``: every occurrence of it (any spelling) replaced by one, at the
    first one's place (appended when there is none)."""
    out: list[str] = []
    placed = False
    for occ in scan(args):
        if isinstance(occ, str):
            out.append(occ)
        elif occ.row.key != key:
            out.extend(occ.tokens)
        elif not placed:
            out.extend(FLAGS[key].to_args(value))
            placed = True
    return out if placed else [*out, *FLAGS[key].to_args(value)]


def without_flags(args: Sequence[str], keep: Callable[[Flag], bool]) -> list[str]:
    """``args`` without the flags ``keep`` rejects (each with its value), every other token as it is."""
    return [t for occ in scan(args) for t in ((occ,) if isinstance(occ, str) else occ.tokens if keep(occ.row) else ())]
