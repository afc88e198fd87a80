//! One gateway process put together: the fleet, the policy runtime, the
//! deployer that owns the live chain, and the data plane reading that
//! chain. The data plane only ever sees the chain, never the deployer.

use std::sync::Arc;

use crate::config::Config;
use crate::control::deploy::Deployer;
use crate::dataplane::server::Gateway;
use crate::fleet::LiveFleet;
use crate::policy::Runtime;

/// The data plane and the control plane's deployer over one fleet.
pub struct Node {
    pub gateway: Arc<Gateway>,
    pub deployer: Arc<Deployer>,
}

impl Node {
    /// Builds the fleet, compiles and trials every policy, opens the usage
    /// database. Fails with a message naming the policy or backend at fault.
    pub async fn start(config: &Config) -> anyhow::Result<Node> {
        let fleet = Arc::new(
            LiveFleet::new(&config.backends, config.health_rules()).map_err(anyhow::Error::msg)?,
        );
        let runtime = Arc::new(Runtime::new(&config.policy_runtime)?);
        let deployer = Arc::new(
            Deployer::start(
                runtime.clone(),
                fleet.clone(),
                &config.policy_chain(),
                config.policy_store.state_dir.clone(),
            )
            .await?,
        );
        let gateway = Gateway::new(config, fleet, runtime, deployer.chain().clone()).await?;
        Ok(Node { gateway, deployer })
    }
}
