"""credlock-tripwire.athena.sql, byte for byte as shipped, run by DuckDB over the sample records
in a view with the Athena CloudTrail table's columns (athena_table.py); the groups, counts,
first/last seen and access keys must be exactly cases.ATHENA_EXPECTED. No dialect adaptation is
needed: every construct the query uses (struct dot access, regexp_extract with a group, ||,
replace, coalesce, LIKE, CASE, count/min/max, array_agg(DISTINCT), array_sort, GROUP BY
ordinals) means the same in Trino (Athena engine v3) and DuckDB.

The original text is also parsed with sqlglot's Trino dialect, and every column path it reads
must exist in the table's DDL (with the sourceidentity line the query's header asks for)."""

import duckdb
import pytest
import sqlglot
from sqlglot import exp

import athena_table
from cases import ATHENA_EXPECTED, ATHENA_FILE, CASES, load_events

SQL = ATHENA_FILE.read_text()


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    c = duckdb.connect()
    athena_table.create_view(c, load_events().values(),
                             tmp_path_factory.mktemp("athena") / "records.jsonl")
    yield c
    c.close()


def test_view_has_the_athena_columns(con):
    cols = [r[0] for r in con.execute("DESCRIBE cloudtrail_logs").fetchall()]
    assert cols == [name for name, _ in athena_table.schema()]
    assert con.execute("SELECT count(*) FROM cloudtrail_logs").fetchone()[0] == len(CASES)
    # JSON SerDe semantics: case-insensitive keys, objects in STRING columns as JSON text
    got = con.execute("SELECT useridentity.sessioncontext.ec2roledelivery, requestparameters "
                      "FROM cloudtrail_logs WHERE eventid LIKE '%000000000105'").fetchone()
    assert got == ("2.0", '{"tableName":"orders"}')


def test_query_groups_exactly(con):
    rows = con.execute(SQL).fetchall()
    assert rows == ATHENA_EXPECTED
    assert sum(r[8] for r in rows) == sum(pos for pos, _ in CASES.values()) == 9


def test_query_without_sourceidentity_column_fails_loudly(tmp_path):
    """AWS's DDL as published (no sourceidentity) makes the query an error, not an empty result."""
    c = duckdb.connect()
    original = athena_table.COLUMNS
    try:
        athena_table.COLUMNS = original.replace(athena_table.ADDED + ",", "")
        assert athena_table.ADDED not in athena_table.COLUMNS
        athena_table.create_view(c, load_events().values(), tmp_path / "r.jsonl")
    finally:
        athena_table.COLUMNS = original
    with pytest.raises(duckdb.Error, match="sourceidentity"):
        c.execute(SQL)


def test_trino_parses_the_original_text():
    tree = sqlglot.parse_one(SQL, read="trino", error_level=sqlglot.ErrorLevel.RAISE)
    assert isinstance(tree, exp.Select)
    # the checker has teeth: a missing parenthesis is a parse error
    with pytest.raises(sqlglot.errors.ParseError):
        sqlglot.parse_one(SQL.replace("coalesce(vpcendpointid, '-')", "coalesce(vpcendpointid, '-'"),
                          read="trino", error_level=sqlglot.ErrorLevel.RAISE)


def test_every_column_read_exists_in_the_ddl():
    tree = sqlglot.parse_one(SQL, read="trino")
    aliases = {a.alias for a in tree.expressions if a.alias}
    known = athena_table.column_paths()
    read = set()
    for col in tree.find_all(exp.Column):
        path = tuple(p.name.lower() for p in col.parts)
        if len(path) == 1 and path[0] in aliases:
            continue
        read.add(path)
    assert read, "no columns found"
    missing = sorted(p for p in read if p not in known)
    assert not missing, missing
    assert ("useridentity", "sessioncontext", "sourceidentity") in read
