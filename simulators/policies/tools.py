"""The probe tool: read-only commands a policy (ThinkRemed's probe agent) may run on a
sandbox node before it writes a playbook.

A command is checked against `ALLOWED`, an allow-list of programs each with its own check of
options and operands, and never against a deny-list: anything not understood is refused.
What runs is rebuilt from the parsed words (`shlex.join`), so the shell on the node sees
exactly what was checked; a pipe may only feed a filter (grep, head, tail, wc, sort, uniq).
`;`, `&&`, `||`, `&`, redirections, subshells, `$`, backticks and newlines are refused
outright. A refusal or a failure is returned as the probe's output (one line starting with
`refused:` or `error:`), never raised: the model reads it and carries on.

    probe = make_probe(sb, ("n0", "n1"))
    probe("n0", "systemctl is-active remed-hello-service")    # "active"
    probe("n0", "rm -rf /")                                    # "refused: rm is not an allowed ..."
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

MAX_COMMAND_CHARS = 500

# Files a probe may read (cat, and grep/head/tail given a file): the service's config, the
# kernel's views, the unit files and drop-ins, name resolution.
READABLE = ("/etc/remed/", "/proc/", "/sys/fs/cgroup/", "/etc/hosts", "/etc/systemd/system/",
            "/run/systemd/system/", "/lib/systemd/system/", "/usr/lib/systemd/system/", "/etc/resolv.conf")

_UNIT = re.compile(r"^[A-Za-z0-9@._:\\*?\[\]-]+$")
_WORD = re.compile(r"^[A-Za-z0-9_.:/@%+=,-]+$")
_NUM = re.compile(r"^\d+$")


class _Refused(Exception):
    """A command is not allowed; the message is the one-line reason."""


def _getopt(prog: str, args: Sequence[str], flags: Iterable[str] = (), with_arg: Iterable[str] = ()
            ) -> tuple[list[tuple[str, str | None]], list[str]]:
    """getopt-like parsing of `args`: short options as letters ("l"), long ones with dashes
    ("--no-pager"); clusters (-tlnp), attached values (-n50, --lines=50) and `--` work.
    Returns (options, operands); an option not listed is refused."""
    flags, with_arg = set(flags), set(with_arg)
    opts: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            operands += args[i + 1:]
            break
        if a.startswith("--"):
            name, eq, val = a.partition("=")
            if name in with_arg:
                if not eq:
                    if i + 1 >= len(args):
                        raise _Refused(f"{prog}: option {name} needs a value")
                    i += 1
                    val = args[i]
                opts.append((name, val))
            elif name in flags and not eq:
                opts.append((name, None))
            else:
                raise _Refused(f"{prog}: option {name} is not allowed in a probe")
        elif a.startswith("-") and len(a) > 1:
            j = 1
            while j < len(a):
                ch = a[j]
                if ch in with_arg:
                    val = a[j + 1:]
                    if not val:
                        if i + 1 >= len(args):
                            raise _Refused(f"{prog}: option -{ch} needs a value")
                        i += 1
                        val = args[i]
                    opts.append((ch, val))
                    break
                if ch in flags:
                    opts.append((ch, None))
                    j += 1
                    continue
                raise _Refused(f"{prog}: option -{ch} is not allowed in a probe")
        else:
            operands.append(a)
        i += 1
    return opts, operands


def _readable(prog: str, path: str) -> None:
    if not path.startswith("/"):
        raise _Refused(f"{prog}: give an absolute path, not '{path}'")
    norm = posixpath.normpath(path)
    for p in READABLE:
        if norm == p.rstrip("/") or (p.endswith("/") and norm.startswith(p)):
            return
    raise _Refused(f"{prog}: {path} is outside what a probe may read ({', '.join(READABLE)})")


def _no_operands(prog: str, operands: list[str]) -> None:
    if operands:
        raise _Refused(f"{prog}: unexpected operand '{operands[0]}'")


def _words(prog: str, operands: Iterable[str], pattern: re.Pattern = _WORD) -> None:
    for w in operands:
        if not pattern.match(w):
            raise _Refused(f"{prog}: operand '{w}' is not allowed")


# ---- the checks, one per program ----------------------------------------------------------

_SYSTEMCTL_VERBS = ("status", "show", "is-active", "is-enabled", "is-failed", "list-units", "list-unit-files",
                    "cat", "list-dependencies")


def _systemctl(args: list[str]) -> None:
    _, ops = _getopt("systemctl", args, flags=("l", "a", "q", "--no-pager", "--full", "--value", "--all", "--plain",
                                               "--no-legend", "--failed", "--quiet"),
                     with_arg=("p", "t", "n", "o", "--property", "--type", "--state", "--lines", "--output"))
    if not ops or ops[0] not in _SYSTEMCTL_VERBS:
        raise _Refused(f"systemctl: only {', '.join(_SYSTEMCTL_VERBS)} are allowed")
    _words("systemctl", ops[1:], _UNIT)


def _journalctl(args: list[str]) -> None:
    opts, ops = _getopt("journalctl", args,
                        flags=("q", "b", "r", "x", "--no-pager", "--quiet", "--reverse", "--utc", "--no-hostname"),
                        with_arg=("u", "n", "o", "p", "g", "S", "U", "--unit", "--lines", "--output", "--since",
                                  "--until", "--priority", "--grep"))
    if not any(k in ("u", "--unit") for k, _ in opts):
        raise _Refused("journalctl: name a unit with -u UNIT (and -n N --no-pager)")
    for k, v in opts:
        if k in ("u", "--unit"):
            _words("journalctl", [v], _UNIT)
    _no_operands("journalctl", ops)


def _top(args: list[str]) -> None:
    opts, ops = _getopt("top", args, flags=("b", "c", "H", "i", "S"), with_arg=("n", "o", "p", "w"))
    keys = dict(opts)
    if "b" not in keys or keys.get("n") != "1":
        raise _Refused("top: only one batch iteration is allowed: top -bn1")
    _no_operands("top", ops)


def _free(args: list[str]) -> None:
    _, ops = _getopt("free", args, flags=("b", "k", "m", "g", "h", "w", "t", "l", "--mega", "--giga", "--human",
                                          "--kilo", "--bytes", "--total", "--wide"))
    _no_operands("free", ops)


def _paths(prog: str, ops: list[str]) -> None:
    for p in ops:
        if not p.startswith("/"):
            raise _Refused(f"{prog}: give absolute paths, not '{p}'")


def _df(args: list[str]) -> None:
    _, ops = _getopt("df", args, flags=("h", "H", "T", "i", "k", "m", "a", "l", "P", "--human-readable",
                                        "--inodes", "--print-type", "--local", "--all"))
    _paths("df", ops)


def _du(args: list[str]) -> None:
    _, ops = _getopt("du", args, flags=("s", "h", "x", "a", "c", "k", "m", "b", "--summarize", "--human-readable",
                                        "--one-file-system", "--all", "--total", "--apparent-size"),
                     with_arg=("d", "t", "--max-depth", "--threshold"))
    _paths("du", ops)


def _ss(args: list[str]) -> None:
    # No -K (kills sockets), -D (dumps to a file), -F (reads a filter file), -N (netns).
    _, ops = _getopt("ss", args, flags=tuple("tulnpaxsoemi46HwO") + (
        "--tcp", "--udp", "--listening", "--numeric", "--processes", "--all", "--summary", "--info", "--extended",
        "--memory", "--options", "--no-header"))
    _words("ss", ops, re.compile(r"^[A-Za-z0-9_:.=!\[\]-]+$"))


_IP_OPTS = ("-4", "-6", "-s", "-d", "-j", "-p", "-o", "-br", "-brief", "-details", "-stats", "-json", "-pretty",
            "-oneline")
_IP_OBJECTS = ("addr", "address", "a", "route", "ro", "r", "link", "l", "neigh", "neighbour", "n", "rule")
_IP_MUTATIONS = ("add", "del", "delete", "flush", "change", "replace", "set", "append", "prepend", "save",
                 "restore", "exec", "up", "down")


def _ip(args: list[str]) -> None:
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] not in _IP_OPTS:
            raise _Refused(f"ip: option {args[i]} is not allowed in a probe")
        i += 1
    rest = args[i:]
    if not rest or rest[0] not in _IP_OBJECTS:
        raise _Refused("ip: only ip addr, ip route, ip link, ip neigh and ip rule (show/get) are allowed")
    verbs = rest[1:2]
    if verbs and verbs[0] not in ("show", "list", "ls", "get") and verbs[0] in _IP_MUTATIONS + ("help",):
        raise _Refused(f"ip: '{verbs[0]}' changes the network; only show/list/get are allowed")
    if verbs and verbs[0] == "get" and rest[0] not in ("route", "ro", "r"):
        raise _Refused("ip: 'get' is allowed for routes only")
    for w in rest[1:]:
        if w in _IP_MUTATIONS:
            raise _Refused(f"ip: '{w}' changes the network; only show/list/get are allowed")
    _words("ip", rest[1:])


def _nft(args: list[str]) -> None:
    # No -f (loads rules from a file), no -i (interactive).
    _, ops = _getopt("nft", args, flags=("a", "n", "s", "j", "t", "--handle", "--numeric", "--stateless", "--json",
                                         "--terse"))
    if not ops or ops[0] != "list":
        raise _Refused("nft: only 'nft list ...' is allowed (e.g. nft list ruleset)")
    _words("nft", ops[1:])


def _tc(args: list[str]) -> None:
    _, ops = _getopt("tc", args, flags=("s", "d", "p", "j", "-stats", "-details", "-pretty", "-json"))
    if len(ops) < 1 or ops[0] not in ("qdisc", "class", "filter"):
        raise _Refused("tc: only 'tc qdisc|class|filter show [dev IF]' is allowed")
    if len(ops) > 1 and ops[1] not in ("show", "list", "ls"):
        raise _Refused(f"tc: '{ops[1]}' changes traffic control; only show is allowed")
    _words("tc", ops[2:])


def _cat(args: list[str]) -> None:
    _, ops = _getopt("cat", args, flags=("n", "A", "v", "E", "T"))
    if not ops:
        raise _Refused("cat: name a file to read")
    for p in ops:
        _readable("cat", p)


def _ls(args: list[str]) -> None:
    _, ops = _getopt("ls", args, flags=tuple("laAhdtrSR1iFnsL") + ("--full-time",))
    _paths("ls", ops)


def _stat(args: list[str]) -> None:
    _, ops = _getopt("stat", args, flags=("L", "f", "t", "--dereference", "--terse"),
                     with_arg=("c", "--format", "--printf"))
    if not ops:
        raise _Refused("stat: name a path")
    _paths("stat", ops)


def _uptime(args: list[str]) -> None:
    _, ops = _getopt("uptime", args, flags=("p", "s", "--pretty", "--since"))
    _no_operands("uptime", ops)


def _curl(args: list[str]) -> None:
    opts, ops = _getopt("curl", args,
                        flags=("s", "S", "f", "i", "I", "v", "L", "--silent", "--show-error", "--fail", "--include",
                               "--head", "--verbose", "--compressed"),
                        with_arg=("m", "w", "o", "H", "--max-time", "--write-out", "--output", "--connect-timeout",
                                  "--header"))
    limit = None
    for k, v in opts:
        if k in ("m", "--max-time", "--connect-timeout"):
            try:
                secs = float(v)
            except ValueError:
                raise _Refused(f"curl: -m takes seconds, not '{v}'") from None
            if not 0 < secs <= 10:
                raise _Refused("curl: keep -m at 10 seconds or less")
            if k != "--connect-timeout":
                limit = secs
        elif k in ("o", "--output") and v != "/dev/null":
            raise _Refused("curl: -o may only be /dev/null (a probe writes no file)")
        elif v is not None and v.startswith("@"):
            raise _Refused(f"curl: option {k} may not read a file (@...)")
    if limit is None:
        raise _Refused("curl: give a time limit, e.g. curl -s -m 3 http://HOST:PORT/health")
    if len(ops) != 1 or not re.match(r"^http://[A-Za-z0-9_.:\[\]-]+(/[^\s]*)?$", ops[0]):
        raise _Refused("curl: exactly one http:// URL is allowed")


_REDIS_COMMANDS = ("ping", "info", "dbsize", "config get")


def _redis_cli(args: list[str]) -> None:
    _, ops = _getopt("redis-cli", args, flags=("--raw", "--no-raw"), with_arg=("h", "p", "n"))
    low = [o.lower() for o in ops]
    if low[:1] in (["ping"], ["dbsize"]) and len(low) == 1:
        return
    if low[:1] == ["info"] and len(low) <= 2:
        _words("redis-cli", ops[1:])
        return
    if low[:2] == ["config", "get"] and len(low) == 3:
        _words("redis-cli", ops[2:], re.compile(r"^[A-Za-z0-9_*-]+$"))
        return
    raise _Refused(f"redis-cli: only {', '.join(_REDIS_COMMANDS)} are allowed")


def _getent(args: list[str]) -> None:
    if len(args) < 2 or args[0] not in ("hosts", "ahosts"):
        raise _Refused("getent: only 'getent hosts NAME' is allowed")
    _words("getent", args[1:])


def _nothing(prog: str) -> Callable[[list[str]], None]:
    def check(args: list[str]) -> None:
        _no_operands(prog, args)
    return check


def _any(args: list[str]) -> None:
    # ps only reads: its options cannot write or run anything.
    _words("ps", args, re.compile(r"^[A-Za-z0-9_.:,=%+-]+$"))


# Filters: as the first stage they read files (under READABLE); after a pipe only their input.
def _filter(prog: str, flags: Iterable[str], with_arg: Iterable[str], takes_pattern: bool = False
            ) -> Callable[[list[str], bool], None]:
    def check(args: list[str], piped: bool) -> None:
        args = [f"-n{a[1:]}" if prog in ("head", "tail") and re.match(r"^-\d+$", a) else a for a in args]
        opts, ops = _getopt(prog, args, flags, with_arg)
        if takes_pattern and not any(k in ("e", "--regexp") for k, _ in opts):
            if not ops:
                raise _Refused(f"{prog}: give a pattern")
            ops = ops[1:]
        if piped:
            if ops:
                raise _Refused(f"{prog}: after a pipe it reads only its input, not '{ops[0]}'")
        else:
            if not ops:
                raise _Refused(f"{prog}: name a file to read, or use it after a pipe")
            for p in ops:
                _readable(prog, p)
    return check


FILTERS: dict[str, Callable[[list[str], bool], None]] = {
    "grep": _filter("grep", flags=tuple("ivcnEFwxoqHh") + ("--color=never",), with_arg=("e", "m", "A", "B", "C",
                                                                                          "--regexp"),
                    takes_pattern=True),
    "head": _filter("head", flags=(), with_arg=("n", "c")),
    "tail": _filter("tail", flags=(), with_arg=("n", "c")),        # no -f: a probe must end
    "wc": _filter("wc", flags=("l", "c", "w", "m"), with_arg=()),
    "sort": _filter("sort", flags=tuple("nrhubfVs"), with_arg=("k", "t")),   # no -o: it writes a file
    "uniq": _filter("uniq", flags=("c", "d", "u", "i"), with_arg=()),        # no OUTPUT operand
}


@dataclass(frozen=True)
class CommandSpec:
    usage: str                                  # how the think prompt lists it
    check: Callable[[list[str]], None]          # raises _Refused with the reason


def _first_filter(prog: str) -> Callable[[list[str]], None]:
    return lambda args: FILTERS[prog](args, False)


ALLOWED: dict[str, CommandSpec] = {
    "systemctl": CommandSpec("systemctl status|show|is-active|is-enabled|is-failed|list-units|cat UNIT "
                             "(options like --no-pager, -p PROP, --value)", _systemctl),
    "journalctl": CommandSpec("journalctl -u UNIT -n N --no-pager", _journalctl),
    "ps": CommandSpec("ps aux, ps -eo pid,ppid,pcpu,pmem,cmd --sort=-pcpu", _any),
    "top": CommandSpec("top -bn1", _top),
    "free": CommandSpec("free -m", _free),
    "df": CommandSpec("df -h [PATH]", _df),
    "du": CommandSpec("du -sh PATH", _du),
    "ss": CommandSpec("ss -tlnp", _ss),
    "ip": CommandSpec("ip addr, ip route, ip link (show)", _ip),
    "nft": CommandSpec("nft list ruleset", _nft),
    "tc": CommandSpec("tc qdisc show [dev IF]", _tc),
    "cat": CommandSpec("cat FILE, for files under " + ", ".join(READABLE) + " (e.g. cat /proc/loadavg)", _cat),
    "grep": CommandSpec("grep [-n] PATTERN FILE (same files as cat)", _first_filter("grep")),
    "head": CommandSpec("head -n N FILE / tail -n N FILE (same files as cat)", _first_filter("head")),
    "tail": CommandSpec("", _first_filter("tail")),
    "ls": CommandSpec("ls -la PATH", _ls),
    "stat": CommandSpec("stat PATH", _stat),
    "uptime": CommandSpec("uptime", _uptime),
    "curl": CommandSpec("curl -s -m 3 http://HOST:PORT/health", _curl),
    "redis-cli": CommandSpec("redis-cli [-h HOST] [-p PORT] ping|info [SECTION]|dbsize|config get NAME", _redis_cli),
    "getent": CommandSpec("getent hosts NAME", _getent),
    "nproc": CommandSpec("nproc", _nothing("nproc")),
    "hostname": CommandSpec("hostname", _nothing("hostname")),
}


@dataclass(frozen=True)
class Check:
    ok: bool
    command: str          # what to run (rebuilt from the checked words) when ok
    reason: str           # why not, one line, when not ok


def check_command(command: str) -> Check:
    """Whether `command` is an allowed read-only probe; never raises."""
    try:
        return Check(True, _check(command), "")
    except _Refused as e:
        return Check(False, "", str(e))


def _check(command: Any) -> str:
    if not isinstance(command, str) or not command.strip():
        raise _Refused("give a command")
    if len(command) > MAX_COMMAND_CHARS:
        raise _Refused(f"the command is longer than {MAX_COMMAND_CHARS} characters")
    for bad, what in (("\n", "a newline"), ("\r", "a carriage return"), ("`", "a backtick"), ("$", "'$'"),
                      ("\x00", "a NUL byte")):
        if bad in command:
            raise _Refused(f"{what} is not allowed in a probe: run one plain command")
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError as e:
        raise _Refused(f"the command does not parse: {e}") from None
    stages: list[list[str]] = [[]]
    for t in tokens:
        if t == "|":
            stages.append([])
        elif t and set(t) <= set("();<>|&"):
            raise _Refused(f"'{t}' is not allowed in a probe: run one command, piped only into "
                           f"{', '.join(FILTERS)}")
        else:
            stages[-1].append(t)
    if any(not s for s in stages):
        raise _Refused("an empty command around a pipe")
    prog, *args = stages[0]
    if prog not in ALLOWED:
        raise _Refused(f"{prog} is not an allowed probe command; allowed: {', '.join(ALLOWED)}")
    ALLOWED[prog].check(args)
    for stage in stages[1:]:
        if stage[0] not in FILTERS:
            raise _Refused(f"a pipe may only feed {', '.join(FILTERS)}, not {stage[0]}")
        FILTERS[stage[0]](stage[1:], True)
    return " | ".join(shlex.join(s) for s in stages)


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = "\n[... {} characters cut ...]\n"
    keep = max(0, limit - len(marker) - 6)
    head, tail = keep * 2 // 3, keep - keep * 2 // 3
    # Both ends: the start of a status and the latest lines of a log both matter.
    return text[:head] + marker.format(len(text) - head - tail) + (text[-tail:] if tail else "")


def format_result(result: Any, max_output: int, timeout_s: float) -> str:
    """An ExecResult as the model reads it: stdout, then stderr and the exit status if any."""
    out = (result.stdout or "").rstrip("\n")
    err = (result.stderr or "").rstrip("\n")
    text = out
    if err:
        text += ("\n" if text else "") + "[stderr]\n" + err
    if result.timed_out:
        text += ("\n" if text else "") + f"[timed out after {timeout_s:g} s]"
    elif result.rc != 0:
        text += ("\n" if text else "") + f"[exit {result.rc}]"
    return _truncate(text or "(no output)", max_output)


def make_probe(sb: Any, inventory_hosts: Sequence[str], *, max_output: int = 2000, timeout_s: float = 10
               ) -> Callable[[str, str], str]:
    """probe(host, command) -> output: an allowed command run on the sandbox node named
    `host` (one of `inventory_hosts`), its output cut to `max_output` characters. Never raises."""
    hosts = tuple(str(h) for h in inventory_hosts)

    def probe(host: str, command: str) -> str:
        host = str(host).strip()
        if host not in hosts:
            return f"refused: host '{host}' is not in the inventory ({', '.join(hosts)})"
        check = check_command(command)
        if not check.ok:
            return f"refused: {check.reason}"
        try:
            names = [n.name for n in sb.nodes]
            index = names.index(host) if host in names else hosts.index(host)
            result = sb.exec(check.command, node=index, timeout=timeout_s)
        except Exception as e:   # a probe's failure is the model's information, not the episode's end
            return f"error: could not run the probe on {host}: {type(e).__name__}: {e}".splitlines()[0]
        return format_result(result, max_output, timeout_s)

    return probe


# ---- how a model asks for a probe -------------------------------------------------------------

PROBE_LINE = re.compile(r"^[ \t>*-]*`?PROBE[ \t]+`?([A-Za-z0-9_.-]+)`?[ \t]*:[ \t]*(.+?)`?[ \t]*$", re.M)


def parse_text_probes(text: str) -> list[tuple[str, str]]:
    """The text protocol: lines `PROBE <host>: <command>` in a model's answer."""
    return [(m.group(1), m.group(2).strip().strip("`").strip()) for m in PROBE_LINE.finditer(text or "")]


def probe_tool(inventory_hosts: Sequence[str]) -> dict:
    """The `probe` tool in OpenAI function-calling format."""
    return {"type": "function", "function": {
        "name": "probe",
        "description": "Run one read-only diagnostic command (from the allow-list) on an inventory host and "
                       "return its output.",
        "parameters": {"type": "object", "properties": {
            "host": {"type": "string", "enum": list(inventory_hosts), "description": "inventory host"},
            "command": {"type": "string", "description": "e.g. systemctl status remed-hello-service --no-pager"}},
            "required": ["host", "command"]}}}
