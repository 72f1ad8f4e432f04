//! Parsing a policy document into [`super::PolicyDocument`], refusing (fail closed, with a
//! message) whatever the evaluator could not judge faithfully: unknown or unsupported
//! operators, policy variables, malformed values and elements ("IAM JSON policy element
//! reference" and "IAM JSON policy elements: Condition operators" in the IAM User Guide).

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::{
    Cmp, Compiled, Condition, Effect, EvalError, Kind, Operator, Patterns, PolicyDocument,
    SetQualifier, Statement, invalid,
};

/// The operators IAM documents, as (name, kind, negated). `ArnEquals` and `ArnLike` behave
/// identically, as do their negations ("IAM JSON policy elements: Condition operators").
const OPERATORS: &[(&str, Kind, bool)] = &[
    ("StringEquals", Kind::StringEquals, false),
    ("StringNotEquals", Kind::StringEquals, true),
    (
        "StringEqualsIgnoreCase",
        Kind::StringEqualsIgnoreCase,
        false,
    ),
    (
        "StringNotEqualsIgnoreCase",
        Kind::StringEqualsIgnoreCase,
        true,
    ),
    ("StringLike", Kind::StringLike, false),
    ("StringNotLike", Kind::StringLike, true),
    ("ArnEquals", Kind::Arn, false),
    ("ArnLike", Kind::Arn, false),
    ("ArnNotEquals", Kind::Arn, true),
    ("ArnNotLike", Kind::Arn, true),
    ("NumericEquals", Kind::Numeric(Cmp::Eq), false),
    ("NumericNotEquals", Kind::Numeric(Cmp::Eq), true),
    ("NumericLessThan", Kind::Numeric(Cmp::Lt), false),
    ("NumericLessThanEquals", Kind::Numeric(Cmp::Le), false),
    ("NumericGreaterThan", Kind::Numeric(Cmp::Gt), false),
    ("NumericGreaterThanEquals", Kind::Numeric(Cmp::Ge), false),
    ("Bool", Kind::Bool, false),
    ("IpAddress", Kind::Ip, false),
    ("NotIpAddress", Kind::Ip, true),
    ("Null", Kind::Null, false),
];

/// Valid IAM operators this evaluator does not implement: refused rather than guessed.
const UNSUPPORTED: &[&str] = &[
    "DateEquals",
    "DateNotEquals",
    "DateLessThan",
    "DateLessThanEquals",
    "DateGreaterThan",
    "DateGreaterThanEquals",
    "BinaryEquals",
];

impl PolicyDocument {
    pub fn parse(text: &str) -> Result<PolicyDocument, EvalError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| EvalError::Json(e.to_string()))?;
        PolicyDocument::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<PolicyDocument, EvalError> {
        let top = value
            .as_object()
            .ok_or_else(|| invalid("the top level must be an object"))?;
        let mut version = None;
        let mut statement = None;
        for (name, element) in top {
            match name.as_str() {
                "Version" => version = Some(version_of(element)?),
                "Id" => {}
                "Statement" => statement = Some(element),
                other => return Err(invalid(format!("unknown top-level element {other:?}"))),
            }
        }
        // Policy variables exist only under 2012-10-17; under 2008-10-17 `${` is literal text.
        let variables = version.as_deref() == Some("2012-10-17");
        let list = match statement {
            Some(Value::Array(items)) => items.iter().collect::<Vec<_>>(),
            Some(item @ Value::Object(_)) => vec![item],
            Some(_) => return Err(invalid("Statement must be an object or an array")),
            None => return Err(invalid("the policy has no Statement")),
        };
        let statements = list
            .into_iter()
            .enumerate()
            .map(|(i, s)| parse_statement(s, variables).map_err(|e| in_statement(i, e)))
            .collect::<Result<_, _>>()?;
        Ok(PolicyDocument {
            version,
            statements,
        })
    }
}

fn version_of(element: &Value) -> Result<String, EvalError> {
    match element.as_str() {
        Some(v @ ("2012-10-17" | "2008-10-17")) => Ok(v.to_string()),
        _ => Err(invalid(format!(
            "Version must be \"2012-10-17\" or \"2008-10-17\", not {element}"
        ))),
    }
}

fn in_statement(index: usize, error: EvalError) -> EvalError {
    match error {
        EvalError::Invalid(m) => invalid(format!("Statement[{index}]: {m}")),
        other => other,
    }
}

const STATEMENT_ELEMENTS: &[&str] = &[
    "Sid",
    "Effect",
    "Action",
    "NotAction",
    "Resource",
    "NotResource",
    "Condition",
    "Principal",
    "NotPrincipal",
];

fn parse_statement(value: &Value, variables: bool) -> Result<Statement, EvalError> {
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("a statement must be an object"))?;
    if let Some(unknown) = obj
        .keys()
        .find(|k| !STATEMENT_ELEMENTS.contains(&k.as_str()))
    {
        return Err(invalid(format!("unknown element {unknown:?}")));
    }
    let sid = match obj.get("Sid") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid("Sid must be a string")),
    };
    let effect = match obj.get("Effect").and_then(Value::as_str) {
        Some("Allow") => Effect::Allow,
        Some("Deny") => Effect::Deny,
        _ => return Err(invalid("Effect must be \"Allow\" or \"Deny\"")),
    };
    let actions = patterns(obj, "Action")?;
    let resources = patterns(obj, "Resource")?;
    for resource in &resources.list {
        check_resource_pattern(resource, variables)?;
    }
    let conditions = match obj.get("Condition") {
        None => Vec::new(),
        Some(block) => parse_conditions(block, variables)?,
    };
    Ok(Statement {
        sid,
        effect,
        actions,
        resources,
        conditions,
    })
}

/// Exactly one of `name` and `Not<name>`, each a string or a non-empty array of strings.
fn patterns(obj: &Map<String, Value>, name: &str) -> Result<Patterns, EvalError> {
    let not_name = format!("Not{name}");
    let (negated, value) = match (obj.get(name), obj.get(&not_name)) {
        (Some(v), None) => (false, v),
        (None, Some(v)) => (true, v),
        _ => {
            return Err(invalid(format!(
                "needs exactly one of {name} and {not_name}"
            )));
        }
    };
    let list = match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| invalid(format!("{name} must hold strings")))?,
        _ => return Err(invalid(format!("{name} must be a string or an array"))),
    };
    Ok(Patterns { negated, list })
}

/// `*` or an ARN with no wildcard in its service segment, which IAM does not allow ("IAM JSON
/// policy elements: Resource").
fn check_resource_pattern(pattern: &str, variables: bool) -> Result<(), EvalError> {
    check_no_variable(pattern, variables)?;
    if pattern == "*" {
        return Ok(());
    }
    if !pattern.starts_with("arn:") {
        return Err(invalid(format!(
            "Resource {pattern:?} is neither \"*\" nor an ARN"
        )));
    }
    let service = pattern.split(':').nth(2).unwrap_or("");
    if service.contains(['*', '?']) {
        return Err(invalid(format!(
            "Resource {pattern:?} has a wildcard in its service segment"
        )));
    }
    Ok(())
}

fn check_no_variable(text: &str, variables: bool) -> Result<(), EvalError> {
    if variables && text.contains("${") {
        return Err(EvalError::Unsupported(format!(
            "the policy variable in {text:?}"
        )));
    }
    Ok(())
}

fn parse_conditions(block: &Value, variables: bool) -> Result<Vec<Condition>, EvalError> {
    let block = block
        .as_object()
        .ok_or_else(|| invalid("Condition must be an object"))?;
    let mut conditions = Vec::new();
    for (name, keys) in block {
        let operator = parse_operator(name)?;
        let keys = keys
            .as_object()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| invalid(format!("{name} must map condition keys to values")))?;
        for (key, values) in keys {
            let values = condition_values(values).ok_or_else(|| {
                invalid(format!(
                    "{name} {key}: values must be strings, booleans or numbers, at least one"
                ))
            })?;
            for value in &values {
                check_no_variable(value, variables)?;
            }
            let compiled = compile(operator.kind, &values)
                .map_err(|bad| invalid(format!("{name} {key}: {bad:?} is not a valid value")))?;
            conditions.push(Condition {
                operator: operator.clone(),
                key: key.clone(),
                values,
                compiled,
            });
        }
    }
    Ok(conditions)
}

fn parse_operator(name: &str) -> Result<Operator, EvalError> {
    let (set, rest) = if let Some(rest) = name.strip_prefix("ForAnyValue:") {
        (Some(SetQualifier::ForAnyValue), rest)
    } else if let Some(rest) = name.strip_prefix("ForAllValues:") {
        (Some(SetQualifier::ForAllValues), rest)
    } else {
        (None, name)
    };
    let (if_exists, base) = match rest.strip_suffix("IfExists") {
        Some(base) => (true, base),
        None => (false, rest),
    };
    if UNSUPPORTED.contains(&base) {
        return Err(EvalError::Unsupported(format!(
            "the condition operator {name:?}"
        )));
    }
    let &(_, kind, negated) = OPERATORS
        .iter()
        .find(|(known, _, _)| *known == base)
        .ok_or_else(|| EvalError::UnknownOperator(name.to_string()))?;
    if kind == Kind::Null && (if_exists || set.is_some()) {
        return Err(invalid(format!(
            "{name}: Null takes neither IfExists nor ForAnyValue/ForAllValues"
        )));
    }
    Ok(Operator {
        name: name.to_string(),
        kind,
        negated,
        if_exists,
        set,
    })
}

/// A string, boolean or number, or a non-empty array of them, as text.
fn condition_values(value: &Value) -> Option<Vec<String>> {
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    match value {
        Value::Array(items) if !items.is_empty() => items.iter().map(scalar).collect(),
        Value::Array(_) => None,
        other => scalar(other).map(|s| vec![s]),
    }
}

/// Parses the policy values an operator compares numerically, as addresses or as booleans;
/// `Err` carries the first malformed value.
fn compile(kind: Kind, values: &[String]) -> Result<Compiled, String> {
    fn all<T>(values: &[String], parse: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
        values
            .iter()
            .map(|v| parse(v).ok_or_else(|| v.clone()))
            .collect()
    }
    Ok(match kind {
        Kind::Ip => Compiled::Nets(all(values, parse_net)?),
        Kind::Numeric(_) => Compiled::Numbers(all(values, parse_number)?),
        Kind::Bool | Kind::Null => Compiled::Bools(all(values, parse_bool)?),
        _ => Compiled::Text,
    })
}

/// A CIDR, or a bare address meaning /32 or /128 ("IAM JSON policy elements: Condition
/// operators", IP address condition operators).
fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

pub(super) fn parse_number(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok().filter(|n| n.is_finite())
}

pub(super) fn parse_bool(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}
