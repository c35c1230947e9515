//! The commands that change something: `allocate`, `deallocate`, `drain`, `hosts delete`.

use anyhow::Result;
use berth_protocol::KeyValue;
use berth_protocol::controller_api::{AllocateBody, DeallocateBody, HostObject, InstanceObject};

use crate::client::Api;
use crate::render::{Fields, kv_list, pretty_json, short_id};
use crate::{AllocateArgs, DeallocateArgs, DrainArgs, hosts, instances};
use berth_http::percent_encode;

pub async fn allocate(api: &Api, args: &AllocateArgs, json: bool) -> Result<()> {
    let body = AllocateBody {
        filter: args.filter.clone().unwrap_or_default(),
        metadata: args.meta.iter().map(|(k, v)| KeyValue::new(k, v)).collect(),
        game_metadata: None,
    };
    let path = format!("/v1/applications/{}/allocate", args.application_id);
    let headers: Vec<(&str, &str)> = args
        .idempotency_key
        .as_deref()
        .map(|k| ("Idempotency-Key", k))
        .into_iter()
        .collect();
    let raw = api.post(&path, &body, &headers).await?;
    if json {
        println!("{}", pretty_json(&raw));
        return Ok(());
    }
    let i: InstanceObject = api.decode(&path, &raw)?;
    println!("allocated instance {} at {}:{}", i.id, i.ip_address, i.port);
    let mut f = Fields::new();
    f.add("host", instances::host_line(&i))
        .add("allocation", i.allocation_id.as_deref().unwrap_or("-"))
        .add("metadata", kv_list(&i.metadata))
        .add("status", i.status.to_string());
    print!("{}", f.render(2));
    let release = match &i.allocation_id {
        Some(a) => format!(
            "berthctl deallocate {} --allocation-id {a}",
            short_id(&i.id)
        ),
        None => format!("berthctl deallocate {}", short_id(&i.id)),
    };
    println!("release it with: {release}");
    Ok(())
}

pub async fn deallocate(api: &Api, args: &DeallocateArgs, json: bool) -> Result<()> {
    let id = instances::resolve(api, &args.instance_id).await?;
    let path = format!("/v1/instances/{}/deallocate", percent_encode(&id));
    let body = DeallocateBody {
        allocation_id: args.allocation_id.clone(),
    };
    // The release is idempotent and answers the same either way; only the state before says
    // whether this call released anything.
    let before_path = format!("/v1/instances/{}", percent_encode(&id));
    let before: Option<InstanceObject> = match api.get_opt(&before_path).await? {
        Some(raw) if !json => Some(api.decode(&before_path, &raw)?),
        _ => None,
    };
    let raw = api.post(&path, &body, &[]).await?;
    if json {
        println!("{}", pretty_json(&raw));
        return Ok(());
    }
    let i: InstanceObject = api.decode(&path, &raw)?;
    let was_allocated = before.as_ref().is_none_or(|b| b.allocation_id.is_some());
    let status = format!(
        "{} {}, state {}",
        i.status.number(),
        i.status.name(),
        i.state
    );
    if was_allocated {
        println!(
            "released instance {} on {}: now {status}",
            i.id, i.host_name
        );
    } else {
        println!(
            "instance {} on {} was not allocated; nothing to release (status {status})",
            i.id, i.host_name
        );
    }
    Ok(())
}

pub async fn drain(api: &Api, args: &DrainArgs, json: bool) -> Result<()> {
    let id = hosts::resolve(api, &args.host).await?;
    let path = format!("/v1/hosts/{id}/drain");
    let raw = if args.undo {
        api.delete(&path).await?
    } else {
        api.post(&path, &serde_json::json!({}), &[]).await?
    };
    if json {
        println!("{}", pretty_json(&raw));
        return Ok(());
    }
    let h: HostObject = api.decode(&path, &raw)?;
    if args.undo {
        println!(
            "host {} ({}) is no longer draining: state {}, it takes allocations and instances again",
            h.id, h.name, h.state
        );
    } else {
        let allocated = h.instances_by_status.get("allocated").copied().unwrap_or(0);
        let matches = match allocated {
            0 => "no match is running there".to_owned(),
            1 => "its 1 allocated instance finishes its match".to_owned(),
            n => format!("its {n} allocated instances finish their matches"),
        };
        println!(
            "host {} ({}) is draining: no new allocations or instances go there; {matches}.\n\
             undo with: berthctl drain {} --undo",
            h.id, h.name, h.id
        );
    }
    Ok(())
}

pub async fn delete_host(api: &Api, host: &str, release: bool, json: bool) -> Result<()> {
    let id = hosts::resolve(api, host).await?;
    let path = if release {
        format!("/v1/hosts/{id}?releaseAllocations=true")
    } else {
        format!("/v1/hosts/{id}")
    };
    let raw = api.delete(&path).await?;
    if json {
        println!("{}", pretty_json(&raw));
        return Ok(());
    }
    let h: HostObject = api.decode(&path, &raw)?;
    let released = h.instances_by_status.get("allocated").copied().unwrap_or(0);
    let released = match released {
        0 => String::new(),
        1 => ", 1 allocation released".to_owned(),
        n => format!(", {n} allocations released"),
    };
    println!(
        "host {} ({}) deleted: {} removed from the inventory{released}. If its agent starts \
         again, it registers as a new host.",
        h.id,
        h.name,
        crate::render::plural(h.instances, "instance", "instances")
    );
    Ok(())
}
