//! Shared by the benches: a gateway wired to an in-process simulator (no sockets).

use std::sync::Arc;
use thingspace_gateway::config::from_toml_with_env;
use thingspace_gateway::runtime::Gateway;
use thingspace_gateway::sim_transport::sim_transport;
use thingspace_sim::{SimOptions, Simulator};

/// Starts a simulator with `accounts` x `devices` and a gateway in front of it (clients open,
/// pages fresh for an hour, a budget no bench reaches).
pub async fn gateway_over_sim(accounts: usize, devices: usize) -> (Simulator, Arc<Gateway>) {
    let sim = Simulator::start(SimOptions {
        listen: ([127, 0, 0, 1], 0).into(),
        accounts,
        devices,
        ..SimOptions::default()
    })
    .await
    .expect("sim");
    let cfg = from_toml_with_env(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nbase_url = \"{}\"\nrate_per_second = 100000.0\nburst = 100000\n\
             [credentials]\nclient_id = \"demo-key\"\nclient_secret = \"demo-secret\"\n\
             username = \"demo-user\"\npassword = \"demo-pass\"\nguard_file = \"\"\n\
             [clients]\nmode = \"none\"\n[cache]\nttl = \"1h\"\n",
            sim.base_url()
        ),
        &[],
    )
    .expect("config");
    let gw = Gateway::with_transport(cfg, sim_transport(&sim, 1 << 26)).expect("gateway builds");
    (sim, gw)
}
