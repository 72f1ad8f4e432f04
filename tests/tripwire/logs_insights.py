"""An offline reader for the subset of the CloudWatch Logs Insights query language that
credlock-tripwire.logs-insights.txt uses. It is a model, not AWS's engine (none runs offline):

* structure: `#` comment lines, commands separated by `|`, each command's name from the
  documented command list, function names from the documented function list
  ("CloudWatch Logs Insights language query syntax",
  https://docs.aws.amazon.com/AmazonCloudWatch/latest/logs/CWL_QuerySyntax.html);
* syntax of the commands it uses (fields, filter, parse with a regex, stats ... by, sort,
  limit), balanced parentheses, closed strings and regex literals; regexes compile;
* evaluation of those commands over CloudTrail records flattened into dotted field names (as
  Logs Insights discovers JSON fields: userIdentity.sessionContext.sourceIdentity, ...).

The evaluation follows the documented meaning (`like /re/` is a regex search, `=` exact,
`earliest`/`latest` take the field from the earliest/latest event, a missing field compares
false); anything outside the subset raises instead of guessing.
"""

import re

COMMANDS = {"anomaly", "dedup", "diff", "display", "fields", "filter", "filterIndex", "limit",
            "lookup", "parse", "pattern", "sort", "SOURCE", "stats", "unmask", "unnest"}
FUNCTIONS = {
    # string
    "concat", "ltrim", "rtrim", "trim", "strlen", "toupper", "tolower", "substr", "replace",
    "strcontains", "isempty", "isblank", "ispresent", "coalesce",
    # numeric, datetime, IP
    "abs", "ceil", "floor", "greatest", "least", "log", "sqrt", "bin", "datefloor", "dateceil",
    "fromMillis", "toMillis", "now", "isValidIp", "isValidIpV4", "isValidIpV6", "isIpInSubnet",
    "isIpv4InSubnet", "isIpv6InSubnet",
    # stats
    "avg", "count", "count_distinct", "max", "min", "pct", "stddev", "sum", "earliest",
    "latest", "sortsFirst", "sortsLast",
}
SYSTEM_FIELDS = {"@timestamp", "@message", "@log", "@logStream", "@ingestionTime"}
KEYWORDS = {"and", "or", "not", "like", "in", "as", "by", "asc", "desc"}

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<re>/(?:[^/\\\n]|\\.)+/)
  | (?P<num>\d+(?:\.\d+)?)
  | (?P<ident>@?[A-Za-z_][A-Za-z0-9_.]*|`[^`]+`)
  | (?P<op>!=|=~|<=|>=|[=<>(),|\[\]*])
""", re.X)


class QueryError(Exception):
    pass


def tokenize(text):
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    src = "\n".join(lines)
    pos, out = 0, []
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m:
            raise QueryError(f"cannot read at {src[pos:pos + 30]!r}")
        kind = m.lastgroup
        if kind != "ws":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def split_commands(tokens):
    cmds, cur = [], []
    for tok in tokens:
        if tok == ("op", "|"):
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    cmds.append(cur)
    if any(not c for c in cmds):
        raise QueryError("empty command")
    return cmds


def py_regex(literal):
    """A Logs Insights /regex/ literal as a compiled Python regex (named groups (?<n>...))."""
    body = literal[1:-1].replace(r"\/", "/")
    return re.compile(re.sub(r"\(\?<([A-Za-z_]\w*)>", r"(?P<\1>", body))


class _Expr:
    """Recursive-descent parser for expressions; builds closures over a row dict."""

    def __init__(self, toks, fields_used, aliases):
        self.toks, self.i = toks, 0
        self.fields_used, self.aliases = fields_used, aliases

    def peek(self, k=0):
        return self.toks[self.i + k] if self.i + k < len(self.toks) else (None, None)

    def take(self, kind=None, value=None):
        tok = self.peek()
        if tok[0] is None or (kind and tok[0] != kind) or (value and tok[1] != value):
            raise QueryError(f"expected {value or kind}, got {tok[1]!r}")
        self.i += 1
        return tok

    def at_end(self):
        return self.i >= len(self.toks)

    def boolean(self):
        left = self.conj()
        while self.peek() == ("ident", "or"):
            self.take()
            l, r = left, self.conj()
            left = lambda row, l=l, r=r: l(row) or r(row)  # noqa: E731
        return left

    def conj(self):
        left = self.neg()
        while self.peek() == ("ident", "and"):
            self.take()
            l, r = left, self.neg()
            left = lambda row, l=l, r=r: l(row) and r(row)  # noqa: E731
        return left

    def neg(self):
        if self.peek() == ("ident", "not"):
            self.take()
            inner = self.neg()
            return lambda row: not inner(row)
        return self.comparison()

    def comparison(self):
        left = self.value()
        tok = self.peek()
        if tok == ("ident", "like") or tok == ("op", "=~"):
            self.take()
            kind, lit = self.take()
            if kind == "re":
                rx = py_regex(lit)
                return lambda row: isinstance(left(row), str) and rx.search(left(row)) is not None
            if kind == "str":
                s = _unquote(lit)
                return lambda row: isinstance(left(row), str) and s in left(row)
            raise QueryError(f"like needs a regex or string, got {lit!r}")
        if tok[0] == "op" and tok[1] in ("=", "!="):
            self.take()
            right = self.value()
            if tok[1] == "=":
                return lambda row: left(row) is not None and left(row) == right(row)
            return lambda row: left(row) is not None and left(row) != right(row)
        if tok[0] == "op" and tok[1] in ("<", ">", "<=", ">=", "["):
            raise QueryError(f"operator {tok[1]!r} is outside the modelled subset")
        return lambda row: bool(left(row))

    def value(self):
        kind, text = self.peek()
        if (kind, text) == ("op", "("):
            self.take()
            inner = self.boolean()
            self.take("op", ")")
            return inner
        if kind == "str":
            self.take()
            s = _unquote(text)
            return lambda row: s
        if kind == "num":
            self.take()
            n = float(text)
            return lambda row: n
        if kind == "ident" and self.peek(1) == ("op", "("):
            return self.call()
        if kind == "ident" and text not in KEYWORDS:
            self.take()
            name = text.strip("`")
            if name not in self.aliases:
                self.fields_used.add(name)
            return lambda row: row.get(name)
        raise QueryError(f"unexpected {text!r}")

    def call(self):
        _, name = self.take("ident")
        if name not in FUNCTIONS:
            raise QueryError(f"unknown function {name}")
        self.take("op", "(")
        args = []
        if self.peek() != ("op", ")"):
            while True:
                args.append(self.value())
                if self.peek() == ("op", ","):
                    self.take()
                    continue
                break
        self.take("op", ")")
        impl = _SCALAR_FUNCS.get(name)
        if impl is None:
            raise QueryError(f"function {name} is outside the modelled subset")
        return lambda row: impl(*[a(row) for a in args])


def _unquote(lit):
    return re.sub(r"\\(.)", r"\1", lit[1:-1])


_SCALAR_FUNCS = {
    "coalesce": lambda *a: next((x for x in a if x is not None), None),
    "concat": lambda *a: None if any(x is None for x in a) else "".join(str(x) for x in a),
    "replace": lambda s, old, new: None if s is None else s.replace(old, new),
    "ispresent": lambda x: x is not None,
}


def flatten(record, prefix="", out=None):
    """A CloudTrail record as Logs Insights field names (dotted paths to scalar leaves)."""
    out = {} if out is None else out
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flatten(value, name + ".", out)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    flatten(item, f"{name}.{i}.", out)
                else:
                    out[f"{name}.{i}"] = item
        elif value is not None:
            out[name] = value
    return out


class Query:
    """Parsed query: .commands (names), .fields_used (source fields read), .run(records)."""

    def __init__(self, text):
        self.fields_used, self.aliases = set(), set()
        self.regexes, self.commands, self._steps = [], [], []
        for toks in split_commands(tokenize(text)):
            kind, name = toks[0]
            if kind != "ident" or name not in COMMANDS:
                raise QueryError(f"unknown command {name!r}")
            self.commands.append(name)
            body = toks[1:]
            for t in body:
                if t[0] == "re":
                    self.regexes.append(py_regex(t[1]))
            step = getattr(self, "_" + name, None)
            if step is None:
                raise QueryError(f"command {name} is outside the modelled subset")
            self._steps.append(step(body))

    def _expr(self, toks):
        return _Expr(toks, self.fields_used, self.aliases)

    def _items(self, toks):
        """Splits tokens on top-level commas: one token list per item."""
        parts, depth, cur = [], 0, []
        for t in toks:
            if t == ("op", "(") or t == ("op", "["):
                depth += 1
            elif t == ("op", ")") or t == ("op", "]"):
                depth -= 1
            if depth < 0:
                raise QueryError("unbalanced parentheses")
            if t == ("op", ",") and depth == 0:
                parts.append(cur)
                cur = []
            else:
                cur.append(t)
        if depth:
            raise QueryError("unbalanced parentheses")
        parts.append(cur)
        return parts

    def _fields(self, toks):
        items = []
        for part in self._items(toks):
            alias = None
            if len(part) >= 3 and part[-2] == ("ident", "as"):
                alias = part[-1][1]
                part = part[:-2]
            p = self._expr(part)
            fn = p.value()
            if not p.at_end():
                raise QueryError(f"trailing tokens in fields: {part[p.i:]}")
            name = alias or part[0][1]
            items.append((name, fn))
            if alias:
                self.aliases.add(alias)

        def step(rows):
            for row in rows:
                for name, fn in items:
                    row[name] = fn(row)
            return rows
        return step

    def _filter(self, toks):
        p = self._expr(toks)
        pred = p.boolean()
        if not p.at_end():
            raise QueryError(f"trailing tokens in filter: {toks[p.i:]}")
        return lambda rows: [r for r in rows if pred(r)]

    def _parse(self, toks):
        if len(toks) != 2 or toks[0][0] != "ident" or toks[1][0] != "re":
            raise QueryError("only `parse <field> /regex/` is modelled")
        field, rx = toks[0][1], py_regex(toks[1][1])
        if not rx.groupindex:
            raise QueryError("parse regex needs named groups")
        self.fields_used.add(field)
        self.aliases.update(rx.groupindex)

        def step(rows):
            for row in rows:
                m = rx.search(row.get(field) or "")
                for g in rx.groupindex:
                    row[g] = m.group(g) if m else None
            return rows
        return step

    def _stats(self, toks):
        by = [i for i, t in enumerate(toks) if t == ("ident", "by")]
        if len(by) != 1:
            raise QueryError("stats needs exactly one `by` here")
        agg_toks, key_toks = toks[:by[0]], toks[by[0] + 1:]
        aggs = []
        for part in self._items(agg_toks):
            if len(part) < 6 or part[-2] != ("ident", "as") or part[1] != ("op", "("):
                raise QueryError(f"stats items must be fn(arg) as alias: {part}")
            fn, alias, arg = part[0][1], part[-1][1], part[2:-3]
            if fn not in FUNCTIONS:
                raise QueryError(f"unknown function {fn}")
            if arg == [("op", "*")]:
                arg_name = None
            elif len(arg) == 1 and arg[0][0] == "ident":
                arg_name = arg[0][1]
                if arg_name not in self.aliases:
                    self.fields_used.add(arg_name)
            else:
                raise QueryError(f"stats argument must be * or a field: {arg}")
            aggs.append((fn, arg_name, alias))
        keys = []
        for part in self._items(key_toks):
            if len(part) != 1 or part[0][0] != "ident":
                raise QueryError(f"stats by must list fields: {part}")
            keys.append(part[0][1])
            if part[0][1] not in self.aliases:
                self.fields_used.add(part[0][1])
        self.aliases.update(a for _, _, a in aggs)

        def step(rows):
            groups = {}
            for row in rows:
                groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
            out = []
            for key, members in groups.items():
                res = dict(zip(keys, key))
                by_time = sorted(members, key=lambda r: r["@timestamp"])
                for fn, arg, alias in aggs:
                    vals = [m.get(arg) for m in by_time] if arg else None
                    if fn == "count":
                        res[alias] = len(members) if arg is None else sum(v is not None for v in vals)
                    elif fn == "count_distinct":
                        res[alias] = len({v for v in vals if v is not None})
                    elif fn == "earliest":
                        res[alias] = next((v for v in vals if v is not None), None)
                    elif fn == "latest":
                        res[alias] = next((v for v in reversed(vals) if v is not None), None)
                    else:
                        raise QueryError(f"stats function {fn} is outside the modelled subset")
                out.append(res)
            return out
        return step

    def _sort(self, toks):
        if not toks or toks[0][0] != "ident":
            raise QueryError("sort needs a field")
        field = toks[0][1]
        desc = len(toks) > 1 and toks[1] == ("ident", "desc")
        if len(toks) > 2 or (len(toks) == 2 and toks[1][1] not in ("asc", "desc")):
            raise QueryError("sort takes one field and asc/desc here")
        return lambda rows: sorted(rows, key=lambda r: r.get(field), reverse=desc)

    def _limit(self, toks):
        if len(toks) != 1 or toks[0][0] != "num":
            raise QueryError("limit needs a number")
        n = int(toks[0][1])
        return lambda rows: rows[:n]

    def run(self, records):
        """Runs over CloudTrail records; @timestamp is eventTime (what CloudTrail's log events carry)."""
        rows = []
        for rec in records:
            row = flatten(rec)
            row["@timestamp"] = rec["eventTime"]
            rows.append(row)
        for step in self._steps:
            rows = step(rows)
        return rows
