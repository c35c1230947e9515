//! `berthctl hosts` and `berthctl hosts show`.

use anyhow::Result;
use berth_protocol::InstanceStatus;
use berth_protocol::controller_api::{HostObject, InstanceObject};

use crate::client::Api;
use crate::render::{Fields, Table, ago_of, plural, pretty_json, when};
use crate::{Exit, instances};

pub async fn list(api: &Api, json: bool) -> Result<()> {
    let raw = api.get("/v1/hosts").await?;
    if json {
        println!("{}", pretty_json(&raw));
        return Ok(());
    }
    let mut hosts: Vec<HostObject> = api.decode("/v1/hosts", &raw)?;
    if hosts.is_empty() {
        println!(
            "No hosts have registered with {}. An agent registers when its agent.toml has \
             controller_url pointing here and the controller's join_token.",
            api.base()
        );
        return Ok(());
    }
    hosts.sort_by_key(|h| h.id);
    let mut t = Table::new([
        "ID",
        "NAME",
        "REGION",
        "DC",
        "KIND",
        "STATE",
        "INSTANCES",
        "LAST HEARTBEAT",
    ]);
    for h in &hosts {
        t.row(vec![
            h.id.to_string(),
            h.name.clone(),
            h.region_name.clone(),
            h.dc_location_name.clone(),
            kind(h.is_virtual),
            h.state.clone(),
            instance_counts(h),
            ago_of(h.last_heartbeat_at.as_deref()),
        ]);
    }
    print!("{}", t.render());
    let mut states: Vec<(String, usize)> = Vec::new();
    for h in &hosts {
        match states.iter_mut().find(|(s, _)| *s == h.state) {
            Some((_, n)) => *n += 1,
            None => states.push((h.state.clone(), 1)),
        }
    }
    let summary: Vec<String> = states.iter().map(|(s, n)| format!("{n} {s}")).collect();
    println!(
        "\n{}: {}",
        plural(hosts.len(), "host", "hosts"),
        summary.join(", ")
    );
    Ok(())
}

pub async fn show(api: &Api, host: &str, json: bool) -> Result<()> {
    let id = resolve(api, host).await?;
    let path = format!("/v1/hosts/{id}");
    let raw = api.get(&path).await?;
    if json {
        println!("{}", pretty_json(&raw));
        return Ok(());
    }
    let h: HostObject = api.decode(&path, &raw)?;
    let mut f = Fields::new();
    f.add("id", h.id.to_string())
        .add("name", &h.name)
        .add("state", state_sentence(&h))
        .add("region", format!("{} (id {})", h.region_name, h.region_id))
        .add(
            "dc location",
            format!("{} (id {})", h.dc_location_name, h.dc_location_id),
        )
        .add("kind", kind(h.is_virtual))
        .add(
            "capacity",
            format!(
                "{} CPUs, {:.1} GiB memory",
                h.capacity.cpus,
                h.capacity.memory_bytes as f64 / f64::from(1u32 << 30)
            ),
        )
        .add("addresses", h.addresses.join(", "))
        .add(
            "agent",
            format!("{} at {}", h.agent_version, h.advertise_url),
        )
        .add(
            "labels",
            if h.labels.is_empty() {
                "-".to_owned()
            } else {
                h.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        )
        .add("registered", when(&h.registered_at))
        .add(
            "last heartbeat",
            h.last_heartbeat_at
                .as_deref()
                .map_or_else(|| "never".to_owned(), when),
        )
        .add("instances", instance_counts(&h));
    print!("{}", f.render(0));

    let all_raw = api.get("/v1/instances").await?;
    let mut list: Vec<InstanceObject> = api.decode("/v1/instances", &all_raw)?;
    list.retain(|i| i.host_id == h.id);
    if !list.is_empty() {
        println!();
        print!("{}", instances::table(&mut list, false));
    }
    Ok(())
}

/// A host by id, or by name (what people remember).
pub async fn resolve(api: &Api, host: &str) -> Result<u64> {
    if let Ok(id) = host.parse::<u64>() {
        return Ok(id);
    }
    let raw = api.get("/v1/hosts").await?;
    let hosts: Vec<HostObject> = api.decode("/v1/hosts", &raw)?;
    if let Some(h) = hosts.iter().find(|h| h.name == host) {
        return Ok(h.id);
    }
    let names: Vec<String> = hosts
        .iter()
        .map(|h| format!("{} ({})", h.name, h.id))
        .collect();
    Err(Exit::failed(format!(
        "error: no host is named {host:?}; known hosts: {}",
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    )))
}

pub fn kind(is_virtual: u8) -> String {
    berth_protocol::HostKind::from_is_virtual(is_virtual == 1).to_string()
}

fn state_sentence(h: &HostObject) -> String {
    match h.state.as_str() {
        "ready" => "ready (reachable, taking allocations)".to_owned(),
        "draining" => {
            "draining (no new allocations or instances; running matches finish; undo with \
             `berthctl drain ID --undo`)"
                .to_owned()
        }
        "not_answering" => format!(
            "NOT ANSWERING: the agent heartbeats but the controller cannot call it at {} since \
             {} ({}); its instances are not allocated until it answers (the controller asks \
             again every few seconds). Check that advertise_url in agent.toml is this \
             machine's and that its port is open to the controller",
            h.advertise_url,
            h.agent_error_since.as_deref().unwrap_or("a moment ago"),
            h.agent_error.as_deref().unwrap_or("no answer"),
        ),
        "unreachable" => format!(
            "UNREACHABLE: no heartbeat since {}; its idle instances left the pool, its matches \
             stay allocated",
            h.last_heartbeat_at.as_deref().unwrap_or("registration")
        ),
        other => other.to_owned(),
    }
}

/// `4 (3 online, 1 allocated)`, in status order.
fn instance_counts(h: &HostObject) -> String {
    let parts: Vec<String> = InstanceStatus::ALL
        .iter()
        .filter_map(|s| {
            let n = *h.instances_by_status.get(s.name())?;
            (n > 0).then(|| format!("{n} {}", s.name()))
        })
        .collect();
    if parts.is_empty() {
        h.instances.to_string()
    } else {
        format!("{} ({})", h.instances, parts.join(", "))
    }
}
