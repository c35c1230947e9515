//! The actuator: asks the inventory for a plan every reconcile interval and carries it out by
//! calling agents, a bounded number at a time, reporting each outcome back.

use std::sync::Arc;
use std::time::Duration;

use berth_protocol::agent_api::DeallocateRequest;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::agent_client::AgentClient;
use crate::inventory::{Action, ActionResult, InventoryHandle};

/// Agent calls in flight at once.
const CONCURRENCY: usize = 64;

pub async fn run(
    inventory: InventoryHandle,
    client: AgentClient,
    mut actions: mpsc::UnboundedReceiver<Action>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let batch = tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => match inventory.plan().await {
                Ok(plan) => plan,
                Err(_) => return,
            },
            a = actions.recv() => match a {
                Some(a) => vec![a],
                None => return,
            },
        };
        for action in batch {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let inventory = inventory.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let result = execute(&client, action).await;
                inventory.action_done(result).await;
                drop(permit);
            });
        }
    }
}

async fn execute(client: &AgentClient, action: Action) -> ActionResult {
    match action {
        Action::Deploy { target, request } => {
            let instance_id = request.id.clone().unwrap_or_default();
            tracing::info!(host_id = target.host_id, instance_id = %instance_id, fleet_id = ?request.fleet_id, "deploying instance");
            ActionResult::Deployed {
                host_id: target.host_id,
                instance_id,
                result: client.deploy(&target, &request).await,
            }
        }
        Action::Remove {
            target,
            instance_id,
        } => {
            tracing::info!(host_id = target.host_id, instance_id = %instance_id, "removing instance");
            ActionResult::Removed {
                host_id: target.host_id,
                result: client.remove(&target, &instance_id).await,
                instance_id,
            }
        }
        Action::Deallocate {
            target,
            instance_id,
            allocation_id,
        } => ActionResult::Deallocated {
            host_id: target.host_id,
            result: client
                .deallocate(
                    &target,
                    &instance_id,
                    DeallocateRequest {
                        allocation_id: Some(allocation_id),
                    },
                    None,
                )
                .await,
        },
        Action::Probe { target } => ActionResult::Probed {
            host_id: target.host_id,
            result: client.probe(&target).await,
        },
    }
}
