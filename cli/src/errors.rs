//! `berthctl errors show IDENTIFIER`: the story of a failed request, told in the order it
//! happened: the request, how the controller decided, what each agent answered.

use anyhow::Result;
use berth_protocol::controller_api::ErrorStory;
use serde_json::Value;

use crate::client::Api;
use crate::render::{Fields, pretty_json, when};
use berth_http::percent_encode;

pub async fn show(api: &Api, identifier: &str, json: bool) -> Result<()> {
    let path = format!("/v1/errors/{}", percent_encode(identifier.trim()));
    let raw = api.get(&path).await?;
    if json {
        println!("{}", pretty_json(&raw));
        return Ok(());
    }
    let story: ErrorStory = api.decode(&path, &raw)?;
    print!("{}", render(&story));
    Ok(())
}

pub fn render(s: &ErrorStory) -> String {
    let mut out = format!("Request {} failed\n", s.identifier);
    let mut f = Fields::new();
    f.add("time", when(&s.timestamp))
        .add("request", format!("{} {}", s.method, s.path))
        .add("answer", format!("HTTP {} {}", s.status_code, s.code));
    if let Some(n) = s.error_code {
        f.add("errorCode", format!("{n} (from a host agent)"));
    }
    f.add("message", &s.message).add("details", &s.details);
    out.push_str(&f.render(2));

    if let Some(d) = s.decision.as_ref().filter(|d| !is_empty(d)) {
        out.push_str("\nDecision\n");
        out.push_str(&decision(d).render(2));
    }

    if s.attempts.is_empty() {
        if s.decision.is_some() {
            out.push_str("\nAttempts: none (no candidate was sent to an agent)\n");
        }
    } else {
        out.push_str(&format!("\nAttempts ({})\n", s.attempts.len()));
        for (n, a) in s.attempts.iter().enumerate() {
            out.push_str(&format!("  {}. instance {}\n", n + 1, a.instance_id));
            let mut f = Fields::new();
            f.add(
                "host",
                format!(
                    "{} (id {}), agent {}",
                    if a.host_name.is_empty() {
                        "?"
                    } else {
                        &a.host_name
                    },
                    a.host_id,
                    a.agent_url
                ),
            )
            .add(
                "answer",
                format!(
                    "HTTP {} {}{} after {} ms",
                    a.status_code,
                    a.code,
                    a.error_code.map_or_else(String::new, |n| format!(" ({n})")),
                    a.elapsed_ms
                ),
            );
            if !a.details.is_empty() {
                f.add("details", &a.details);
            }
            out.push_str(&f.render(5));
        }
    }
    out.push_str(&format!(
        "\nWhat the code means: berthctl explain {}\n",
        s.code
    ));
    out
}

fn is_empty(v: &Value) -> bool {
    v.is_null() || v.as_object().is_some_and(serde_json::Map::is_empty)
}

/// The engine's counts as sentences. Unknown keys are shown as they are, so a newer controller
/// never hides part of its story from an older berthctl.
fn decision(d: &Value) -> Fields {
    let mut f = Fields::new();
    let Some(obj) = d.as_object() else {
        f.add("decision", d.to_string());
        return f;
    };
    // The story's order: what was asked, what there was, what the filter removed, what was
    // left and why none of it could be taken. Then whatever else a newer controller adds.
    const ORDER: [&str; 5] = [
        "filter",
        "candidates",
        "removedByFilter",
        "matching",
        "unavailable",
    ];
    let known = ORDER.iter().filter_map(|k| Some((*k, obj.get(*k)?)));
    let rest = obj
        .iter()
        .filter(|(k, _)| !ORDER.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v));
    for (key, v) in known.chain(rest) {
        match key {
            "filter" => {
                let text = v.as_str().unwrap_or_default();
                f.add(
                    "filter",
                    if text.is_empty() {
                        "(none)".to_owned()
                    } else {
                        text.to_owned()
                    },
                );
            }
            "candidates" => {
                f.add("candidates", format!("{v} instances of the application"));
            }
            "removedByFilter" => {
                for c in v.as_array().into_iter().flatten() {
                    let cond = c.get("condition").and_then(Value::as_str).unwrap_or("?");
                    let n = c.get("removed").cloned().unwrap_or(Value::Null);
                    f.add(&format!("removed by {cond}"), n.to_string());
                }
            }
            "matching" => {
                f.add("matching the filter", v.to_string());
            }
            "unavailable" => {
                let parts: Vec<String> = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(why, n)| format!("{n} {why}"))
                    .collect();
                f.add(
                    "not allocatable",
                    if parts.is_empty() {
                        "-".to_owned()
                    } else {
                        parts.join(", ")
                    },
                );
            }
            other => {
                f.add(other, v.to_string());
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::controller_api::AttemptStory;

    #[test]
    fn tells_the_story() {
        let s = ErrorStory {
            identifier: "abc".into(),
            timestamp: "2026-01-01T00:00:00Z".into(),
            method: "POST".into(),
            path: "/v1/applications/1/allocate".into(),
            status_code: 422,
            code: "INSTANCE_ALREADY_ALLOCATED".into(),
            error_code: Some(76006),
            message: "Unable to allocate application instance.".into(),
            details: "tried 1 candidate".into(),
            decision: Some(serde_json::json!({
                "filter": "regionName=local",
                "candidates": 4,
                "removedByFilter": [{"condition": "regionName=local", "removed": 0}],
                "matching": 4,
                "unavailable": {"allocated": 3},
            })),
            attempts: vec![AttemptStory {
                instance_id: "i-1".into(),
                host_id: 1,
                host_name: "dev-host-1".into(),
                agent_url: "http://127.0.0.1:6824".into(),
                status_code: 422,
                error_code: Some(76006),
                code: "INSTANCE_ALREADY_ALLOCATED".into(),
                details: "already allocated".into(),
                elapsed_ms: 3,
            }],
        };
        let out = render(&s);
        for want in [
            "POST /v1/applications/1/allocate",
            "HTTP 422 INSTANCE_ALREADY_ALLOCATED",
            "removed by regionName=local:",
            "3 allocated",
            "1. instance i-1",
            "dev-host-1 (id 1), agent http://127.0.0.1:6824",
            "(76006) after 3 ms",
            "berthctl explain INSTANCE_ALREADY_ALLOCATED",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
    }
}
