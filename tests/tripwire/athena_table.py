"""The Athena CloudTrail table, rebuilt in DuckDB from sample records.

COLUMNS is the column list of AWS's CREATE EXTERNAL TABLE cloudtrail_logs in "Create a table for
CloudTrail logs in Athena using manual partitioning"
(https://docs.aws.amazon.com/athena/latest/ug/create-cloudtrail-table.html), from eventversion
to eventcategory, plus tlsdetails as in the earlier version of the same page; the later columns
(addendum, ...) are left out, the query reads none of them. The one change is the line marked
ADDED: AWS's sessioncontext struct has no sourceidentity, and credlock-tripwire.athena.sql says
to add it.

Records become rows the way Athena's JSON SerDe (org.apache.hive.hcatalog.data.JsonSerDe) reads
them: keys match declared names case-insensitively (CloudTrail writes userIdentity, the table
says useridentity), undeclared keys are dropped, and a STRING column holding a JSON object
(requestparameters, ...) gets that object's JSON text, which is why AWS tells you to read those
with json_extract. hive_to_duckdb turns the Hive types into DuckDB's.
"""

import json
import re

COLUMNS = """
eventversion STRING,
useridentity STRUCT<
               type:STRING,
               principalid:STRING,
               arn:STRING,
               accountid:STRING,
               invokedby:STRING,
               accesskeyid:STRING,
               username:STRING,
               onbehalfof: STRUCT<
                    userid: STRING,
                    identitystorearn: STRING>,
  sessioncontext:STRUCT<
    attributes:STRUCT<
               mfaauthenticated:STRING,
               creationdate:STRING>,
    sessionissuer:STRUCT<
               type:STRING,
               principalid:STRING,
               arn:STRING,
               accountid:STRING,
               username:STRING>,
    ec2roledelivery:string,
    sourceidentity:string,
    webidfederationdata: STRUCT<
               federatedprovider: STRING,
               attributes: map<string,string>>
  >
>,
eventtime STRING,
eventsource STRING,
eventname STRING,
awsregion STRING,
sourceipaddress STRING,
useragent STRING,
errorcode STRING,
errormessage STRING,
requestparameters STRING,
responseelements STRING,
additionaleventdata STRING,
requestid STRING,
eventid STRING,
resources ARRAY<STRUCT<
               arn:STRING,
               accountid:STRING,
               type:STRING>>,
eventtype STRING,
apiversion STRING,
readonly STRING,
recipientaccountid STRING,
serviceeventdetails STRING,
sharedeventid STRING,
vpcendpointid STRING,
vpcendpointaccountid STRING,
eventcategory STRING,
tlsdetails STRUCT<
  tlsversion:STRING,
  ciphersuite:STRING,
  clientprovidedhostheader:STRING>
"""
ADDED = "sourceidentity:string"

_TOKEN = re.compile(r"\s*(?:(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<sym>[<>,:]))")


def _tokens(text):
    pos, out = 0, []
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read DDL at {text[pos:pos + 30]!r}")
        out.append(m.group("word") or m.group("sym"))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


class _Parser:
    """Types: STRING | BOOLEAN | INT | BIGINT | DOUBLE | STRUCT<name:type,...> | ARRAY<type> | MAP<type,type>.
    A type is ("scalar", name) | ("struct", [(field, type)]) | ("array", type) | ("map", k, v)."""

    def __init__(self, text):
        self.toks = _tokens(text)
        self.i = 0

    def next(self, want=None):
        tok = self.toks[self.i]
        if want is not None and tok.lower() != want:
            raise ValueError(f"expected {want!r}, got {tok!r}")
        self.i += 1
        return tok

    def type(self):
        name = self.next().lower()
        if name == "struct":
            self.next("<")
            fields = []
            while True:
                field = self.next().lower()
                self.next(":")
                fields.append((field, self.type()))
                if self.next() == ">":
                    return ("struct", fields)
        if name == "array":
            self.next("<")
            inner = self.type()
            self.next(">")
            return ("array", inner)
        if name == "map":
            self.next("<")
            key = self.type()
            self.next(",")
            value = self.type()
            self.next(">")
            return ("map", key, value)
        if name in ("string", "boolean", "int", "bigint", "double"):
            return ("scalar", name)
        raise ValueError(f"unknown type {name!r}")

    def columns(self):
        cols = []
        while self.i < len(self.toks):
            name = self.next().lower()
            cols.append((name, self.type()))
            if self.i < len(self.toks):
                self.next(",")
        return cols


def schema():
    """[(column, type)] of the table."""
    return _Parser(COLUMNS).columns()


_SCALARS = {"string": "VARCHAR", "boolean": "BOOLEAN", "int": "INTEGER", "bigint": "BIGINT",
            "double": "DOUBLE"}


def hive_to_duckdb(t):
    kind = t[0]
    if kind == "scalar":
        return _SCALARS[t[1]]
    if kind == "struct":
        return "STRUCT(" + ", ".join(f'"{f}" {hive_to_duckdb(ft)}' for f, ft in t[1]) + ")"
    if kind == "array":
        return hive_to_duckdb(t[1]) + "[]"
    return f"MAP({hive_to_duckdb(t[1])}, {hive_to_duckdb(t[2])})"


def _convert(value, t):
    if value is None:
        return None
    kind = t[0]
    if kind == "scalar":
        if t[1] == "string" and isinstance(value, (dict, list)):
            return json.dumps(value, separators=(",", ":"))
        if t[1] == "string" and isinstance(value, bool):
            return "true" if value else "false"
        return value if t[1] != "string" else str(value)
    if kind == "struct":
        if not isinstance(value, dict):
            return None
        lower = {k.lower(): v for k, v in value.items()}
        return {f: _convert(lower.get(f), ft) for f, ft in t[1]}
    if kind == "array":
        return [_convert(v, t[1]) for v in value] if isinstance(value, list) else None
    return {str(k): _convert(v, t[2]) for k, v in value.items()} if isinstance(value, dict) else None


def row(record):
    """One CloudTrail record as the table's row (a dict keyed by column)."""
    return _convert(record, ("struct", schema()))


def column_paths():
    """Every readable path, e.g. ("useridentity", "sessioncontext", "sourceidentity")."""
    out = set()

    def walk(prefix, t):
        out.add(prefix)
        if t[0] == "struct":
            for f, ft in t[1]:
                walk(prefix + (f,), ft)

    for name, t in schema():
        walk((name,), t)
    return out


def create_view(con, records, path):
    """Writes the rows as JSON lines to `path` and creates the view cloudtrail_logs over them."""
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(row(r)) + "\n")
    columns = "{" + ", ".join(f"'{name}': '{hive_to_duckdb(t)}'" for name, t in schema()) + "}"
    con.execute(f"CREATE VIEW cloudtrail_logs AS SELECT * FROM read_json('{path}', "
                f"format = 'newline_delimited', columns = {columns})")
