//! `berthctl explain CODE`: works without a controller, because the moment one needs it is
//! often the moment the controller is the problem. The text lives in berth-protocol, next to
//! the codes, so it cannot drift from them.

use anyhow::Result;
use berth_protocol::ErrorCode;

use crate::render::{Fields, Table, pretty_json};
use crate::{Exit, ExplainArgs};

/// The codes a user's text names: a string code in any case (dashes or spaces for
/// underscores), or a 76000-series number (76007 names two).
pub fn lookup(text: &str) -> Vec<ErrorCode> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u32>() {
        return ErrorCode::from_agent_code(n);
    }
    let normal: String = text
        .chars()
        .map(|c| if c == '-' || c == ' ' { '_' } else { c })
        .collect();
    ErrorCode::parse(&normal).into_iter().collect()
}

pub fn run(args: &ExplainArgs, json: bool) -> Result<()> {
    if args.all {
        list_all(json);
        return Ok(());
    }
    let text = args.code.as_deref().unwrap_or_default();
    let codes = lookup(text);
    if codes.is_empty() {
        return Err(unknown(text));
    }
    if json {
        let v: Vec<serde_json::Value> = codes.iter().map(|c| to_json(*c)).collect();
        let v = if v.len() == 1 {
            v.into_iter().next().unwrap_or_default()
        } else {
            serde_json::Value::Array(v)
        };
        println!("{}", pretty_json(v.to_string().as_bytes()));
        return Ok(());
    }
    if codes.len() > 1 {
        println!(
            "{text} is {} codes; the `code` field of the error says which one happened.\n",
            codes.len()
        );
    }
    let blocks: Vec<String> = codes.iter().map(|c| explain(*c)).collect();
    print!("{}", blocks.join("\n"));
    Ok(())
}

pub fn explain(code: ErrorCode) -> String {
    let e = code.explain();
    let mut out = format!("{code}\n");
    let mut f = Fields::new();
    f.add(
        "errorCode",
        match code.agent_code() {
            Some(n) => format!("{n} (a host agent code)"),
            None => "none (a controller code)".to_owned(),
        },
    )
    .add("HTTP status", code.http_status().to_string())
    .add("meaning", e.meaning);
    out.push_str(&f.render(2));
    out.push_str("\nLikely causes:\n");
    for c in e.causes {
        out.push_str(&format!("  - {c}\n"));
    }
    out.push_str("\nWhat to check:\n");
    for c in e.checks {
        out.push_str(&format!("  - {c}\n"));
    }
    out
}

fn to_json(code: ErrorCode) -> serde_json::Value {
    let e = code.explain();
    serde_json::json!({
        "code": code.as_str(),
        "errorCode": code.agent_code(),
        "httpStatus": code.http_status(),
        "meaning": e.meaning,
        "causes": e.causes,
        "checks": e.checks,
    })
}

fn list_all(json: bool) {
    if json {
        let v: Vec<serde_json::Value> = ErrorCode::ALL.iter().map(|c| to_json(*c)).collect();
        println!(
            "{}",
            pretty_json(serde_json::Value::Array(v).to_string().as_bytes())
        );
        return;
    }
    let mut t = Table::new(["CODE", "ERRORCODE", "HTTP", "MEANING"]);
    for c in ErrorCode::ALL {
        t.row(vec![
            c.as_str().to_owned(),
            c.agent_code()
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            c.http_status().to_string(),
            c.explain().meaning.to_owned(),
        ]);
    }
    print!("{}", t.render());
    println!("\nberthctl explain CODE (or the number) prints the causes and what to check.");
}

fn unknown(text: &str) -> anyhow::Error {
    let needle = text.trim().to_ascii_uppercase().replace(['-', ' '], "_");
    let close: Vec<&str> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str())
        .filter(|c| !needle.is_empty() && (c.contains(&needle) || needle.contains(c)))
        .collect();
    let mut msg = format!("error: {text:?} is not a Berth error code.");
    if !close.is_empty() {
        msg.push_str(&format!("\nDid you mean: {}?", close.join(", ")));
    }
    msg.push_str("\nValid codes:");
    for c in ErrorCode::ALL {
        match c.agent_code() {
            Some(n) => msg.push_str(&format!("\n  {n}  {c}")),
            None => msg.push_str(&format!("\n         {c}")),
        }
    }
    Exit::failed(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        assert_eq!(
            lookup("no_allocatable_instance"),
            vec![ErrorCode::NoAllocatableInstance]
        );
        assert_eq!(
            lookup("no-allocatable-instance"),
            vec![ErrorCode::NoAllocatableInstance]
        );
        assert_eq!(lookup("76006"), vec![ErrorCode::InstanceAlreadyAllocated]);
        assert_eq!(lookup("76007").len(), 2);
        assert!(lookup("76099").is_empty());
        assert!(lookup("nope").is_empty());
    }
}
