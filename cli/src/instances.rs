//! `berthctl instances`, `instances show`, `instances info`.

use std::time::Duration;

use anyhow::Result;
use berth_protocol::InstanceStatus;
use berth_protocol::controller_api::InstanceObject;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::client::Api;
use crate::render::{Fields, Table, kv_list, or_dash, plural, pretty_json, short_id, when};
use crate::{Exit, InstancesArgs, hosts};
use berth_http::percent_encode;

pub fn query(args: &InstancesArgs) -> String {
    let mut q = Vec::new();
    if let Some(f) = args.filter.as_deref().filter(|f| !f.trim().is_empty()) {
        q.push(format!("filter={}", percent_encode(f)));
    }
    if let Some(s) = args.status {
        q.push(format!("status={s}"));
    }
    if args.all {
        q.push("all=true".to_owned());
    }
    if let Some(a) = args.application {
        q.push(format!("applicationId={a}"));
    }
    if q.is_empty() {
        "/v1/instances".to_owned()
    } else {
        format!("/v1/instances?{}", q.join("&"))
    }
}

pub async fn list(api: &Api, args: &InstancesArgs, json: bool) -> Result<()> {
    let path = query(args);
    let raw = api.get(&path).await?;
    if json {
        println!("{}", pretty_json(&raw));
        return Ok(());
    }
    let mut list: Vec<InstanceObject> = api.decode(&path, &raw)?;
    if list.is_empty() {
        let mut what = Vec::new();
        if let Some(f) = &args.filter {
            what.push(format!("filter {f:?}"));
        }
        if let Some(s) = args
            .status
            .and_then(|s| InstanceStatus::from_number(s.into()))
        {
            what.push(format!("status {s}"));
        }
        if let Some(a) = args.application {
            what.push(format!("application {a}"));
        }
        if what.is_empty() {
            println!(
                "No instances. Instances come from fleets: check `berthctl hosts` for registered \
                 hosts and that a fleet covers their region."
            );
        } else {
            println!("No instances match {}.", what.join(", "));
        }
        return Ok(());
    }
    print!("{}", table(&mut list, args.wide));
    println!("\n{}", summary(&list));
    Ok(())
}

/// The instance table; sorts `list` the way it prints it (application, host, port).
pub fn table(list: &mut [InstanceObject], wide: bool) -> String {
    list.sort_by(|a, b| {
        (a.application_id, &a.host_name, a.port).cmp(&(b.application_id, &b.host_name, b.port))
    });
    let id = |s: &str| if wide { s.to_owned() } else { short_id(s) };
    let players = |i: &InstanceObject| match (i.num_players, i.num_players_max) {
        (Some(n), Some(m)) => format!("{n}/{m}"),
        (Some(n), None) => n.to_string(),
        _ => "-".to_owned(),
    };
    let status = |i: &InstanceObject| format!("{} {}", i.status.number(), i.status.name());
    let mut t = if wide {
        Table::new([
            "ID",
            "APP",
            "FLEET",
            "HOST",
            "REGION",
            "DC",
            "ADDRESS",
            "MGMT",
            "STATUS",
            "STATE",
            "ARCUS",
            "PID",
            "RESTARTS",
            "PLAYERS",
            "BUILD",
            "ALLOCATION",
        ])
    } else {
        Table::new([
            "ID",
            "APP",
            "FLEET",
            "HOST",
            "REGION",
            "PORT",
            "STATUS",
            "STATE",
            "PID",
            "PLAYERS",
            "ALLOCATION",
        ])
    };
    for i in list.iter() {
        let alloc = i
            .allocation_id
            .as_deref()
            .map_or_else(|| "-".to_owned(), id);
        if wide {
            t.row(vec![
                i.id.clone(),
                i.application_id.to_string(),
                or_dash(i.fleet_id),
                i.host_name.clone(),
                i.region_name.clone(),
                i.dc_location_name.clone(),
                format!("{}:{}", i.ip_address, i.port),
                i.management_port.to_string(),
                status(i),
                i.state.to_string(),
                if i.arcus_connected { "up" } else { "down" }.to_owned(),
                or_dash(i.pid),
                i.restarts.to_string(),
                players(i),
                format!("{}/{}", i.profile_id, i.build),
                alloc,
            ]);
        } else {
            t.row(vec![
                id(&i.id),
                i.application_id.to_string(),
                or_dash(i.fleet_id),
                i.host_name.clone(),
                i.region_name.clone(),
                i.port.to_string(),
                status(i),
                i.state.to_string(),
                or_dash(i.pid),
                players(i),
                alloc,
            ]);
        }
    }
    t.render()
}

/// `6 instances: 4 online, 2 allocated`.
pub fn summary(list: &[InstanceObject]) -> String {
    let parts: Vec<String> = InstanceStatus::ALL
        .iter()
        .filter_map(|s| {
            let n = list.iter().filter(|i| i.status == *s).count();
            (n > 0).then(|| format!("{n} {}", s.name()))
        })
        .collect();
    format!(
        "{}: {}",
        plural(list.len(), "instance", "instances"),
        parts.join(", ")
    )
}

/// A full instance id from a prefix as shown in the table. Unknown prefixes go to the
/// controller unchanged so that its 404 names them.
pub async fn resolve(api: &Api, id: &str) -> Result<String> {
    if id.len() >= 36 {
        return Ok(id.to_owned());
    }
    let path = "/v1/instances?all=true";
    let raw = api.get(path).await?;
    let list: Vec<InstanceObject> = api.decode(path, &raw)?;
    let found: Vec<&InstanceObject> = list.iter().filter(|i| i.id.starts_with(id)).collect();
    match found.as_slice() {
        [] => Ok(id.to_owned()),
        [one] => Ok(one.id.clone()),
        many => Err(Exit::failed(format!(
            "error: {id:?} is the start of {} instance ids: {}; give more of it",
            many.len(),
            many.iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

async fn fetch(api: &Api, id: &str) -> Result<(InstanceObject, bytes::Bytes)> {
    let id = resolve(api, id).await?;
    let path = format!("/v1/instances/{}", percent_encode(&id));
    let raw = api.get(&path).await?;
    Ok((api.decode(&path, &raw)?, raw))
}

pub async fn show(api: &Api, id: &str, json: bool) -> Result<()> {
    let (i, raw) = fetch(api, id).await?;
    if json {
        println!("{}", pretty_json(&raw));
        return Ok(());
    }
    print!("{}", details(&i).render(0));
    Ok(())
}

/// Where an instance runs: `name (id N), region / dc location, kind`.
pub fn host_line(i: &InstanceObject) -> String {
    format!(
        "{} (id {}), {} / {}, {}",
        i.host_name,
        i.host_id,
        i.region_name,
        i.dc_location_name,
        hosts::kind(i.is_virtual)
    )
}

pub fn details(i: &InstanceObject) -> Fields {
    let mut f = Fields::new();
    f.add("id", &i.id)
        .add("application", i.application_id.to_string())
        .add("fleet", or_dash(i.fleet_id))
        .add("profile", format!("{} (build {})", i.profile_id, i.build))
        .add("host", host_line(i))
        .add("address", format!("{}:{}", i.ip_address, i.port))
        .add("management port", i.management_port.to_string())
        .add("status", i.status.to_string())
        .add("state", i.state.to_string())
        .add(
            "arcus link",
            match (i.arcus_connected, &i.arcus_error) {
                (true, _) => "up".to_owned(),
                (false, Some(why)) => format!("down: {why}"),
                (false, None) => "down".to_owned(),
            },
        )
        .add(
            "process",
            format!(
                "pid {}, {}, autoRestart {}",
                or_dash(i.pid),
                plural(i.restarts as usize, "restart", "restarts"),
                i.auto_restart
            ),
        );
    if let (Some(n), Some(m)) = (i.num_players, i.num_players_max) {
        f.add("players", format!("{n}/{m}"));
    }
    let live: Vec<String> = [
        ("name", &i.live_host_name),
        ("map", &i.live_map),
        ("rules", &i.live_rules),
        ("version", &i.live_game_version),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
    .collect();
    if !live.is_empty() {
        f.add("live state", live.join(", "));
    }
    match &i.allocation_id {
        Some(a) => {
            f.add(
                "allocation",
                format!(
                    "{a}{}",
                    i.allocated_at
                        .as_deref()
                        .map_or_else(String::new, |t| format!(", since {}", when(t)))
                ),
            );
        }
        None => {
            f.add("allocation", "-");
        }
    }
    f.add("metadata", kv_list(&i.metadata))
        .add("reverse metadata", kv_list(&i.reverse_metadata))
        .add("created", when(&i.created_at))
        .add("updated", when(&i.updated_at))
        .add(
            "game log",
            format!("<agent state_dir>/logs/{}.log on {}", i.id, i.host_name),
        );
    f
}

/// Sends `INFO` to the game port and returns the one JSON line the game answers.
pub async fn game_info(addr: &str) -> Result<String> {
    let step = Duration::from_secs(3);
    let mut stream = tokio::time::timeout(step, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out"))?
        .map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))?;
    stream.write_all(b"INFO\n").await?;
    let mut line = String::new();
    tokio::time::timeout(step, BufReader::new(stream).read_line(&mut line))
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer INFO within 3 s"))??;
    if line.trim().is_empty() {
        anyhow::bail!("{addr} closed the connection without answering INFO");
    }
    Ok(line.trim().to_owned())
}

pub async fn info(api: &Api, id: &str, json: bool) -> Result<()> {
    let (i, _) = fetch(api, id).await?;
    let addr = format!("{}:{}", i.ip_address, i.port);
    let line = game_info(&addr).await.map_err(|e| {
        Exit::failed(format!(
            "error: asking the game of instance {} for INFO failed: {e:#}\n\
             (only games that answer INFO on their game port, like berth-sample-game, can be asked)",
            i.id
        ))
    })?;
    if json {
        println!("{}", pretty_json(line.as_bytes()));
    } else {
        println!("instance {} at {addr} answers INFO:", i.id);
        println!("{}", pretty_json(line.as_bytes()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encodes_the_filter() {
        let args = InstancesArgs {
            filter: Some("regionName=eu-west-1 and fleetId=456".into()),
            status: Some(4),
            all: true,
            application: Some(7),
            wide: false,
            command: None,
        };
        assert_eq!(
            query(&args),
            "/v1/instances?filter=regionName%3Deu-west-1%20and%20fleetId%3D456&status=4&all=true&applicationId=7"
        );
    }
}
