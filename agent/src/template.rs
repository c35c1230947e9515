//! Launch templates: `{port}`, `{managementPort}`, … in a profile's arguments and environment.

/// The names a template may use (DESIGN.md §4.1).
pub const VARIABLES: [&str; 10] = [
    "port",
    "managementPort",
    "instanceId",
    "hostId",
    "hostName",
    "region",
    "dcLocation",
    "fleetId",
    "applicationId",
    "build",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "unknown template variable {{{name}}} in {text:?}; known: {{port}}, {{managementPort}}, {{instanceId}}, {{hostId}}, {{hostName}}, {{region}}, {{dcLocation}}, {{fleetId}}, {{applicationId}}, {{build}} (write {{{{ for a literal brace)"
    )]
    Unknown { name: String, text: String },
    #[error("unclosed '{{' in {0:?}; write {{{{ for a literal brace")]
    Unclosed(String),
}

/// Replaces every `{name}` by `lookup(name)`; `{{` and `}}` stand for literal braces.
pub fn expand(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
        } else if let Some(after) = tail.strip_prefix('}') {
            out.push('}');
            rest = after;
        } else {
            let end = tail
                .find('}')
                .ok_or_else(|| TemplateError::Unclosed(text.to_owned()))?;
            let name = &tail[1..end];
            let value = lookup(name).ok_or_else(|| TemplateError::Unknown {
                name: name.to_owned(),
                text: text.to_owned(),
            })?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "port" => Some("20001".into()),
            "instanceId" => Some("abc".into()),
            _ => None,
        }
    }

    #[test]
    fn expands() {
        assert_eq!(expand("-port={port}", &vars).expect("ok"), "-port=20001");
        assert_eq!(
            expand("{instanceId}-{port}", &vars).expect("ok"),
            "abc-20001"
        );
        assert_eq!(expand("{{literal}} }", &vars).expect("ok"), "{literal} }");
        assert_eq!(expand("plain", &vars).expect("ok"), "plain");
        assert!(matches!(
            expand("{nope}", &vars),
            Err(TemplateError::Unknown { .. })
        ));
        assert!(matches!(
            expand("{port", &vars),
            Err(TemplateError::Unclosed(_))
        ));
        assert_eq!(expand("é{port}ü", &vars).expect("ok"), "é20001ü");
    }
}
