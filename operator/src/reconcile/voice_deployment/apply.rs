//! Writing the desired set: every owned object through the owned-object cache
//! ([`crate::observed`]), so an unchanged object costs no request, and the
//! hand-over of `spec.replicas` to an HPA.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};

use crate::autoscale::HANDOVER_FIELD_MANAGER;
use crate::context::Context;
use crate::error::Result;
use crate::observed::ObjKey;
use crate::reconcile::{apply_changed, delete_if_exists, foreign_observed};
use crate::resources::configmap::legacy_routes_config_map_name;
use crate::resources::{DesiredObjects, FIELD_MANAGER};
use callmeback_api::VoiceDeployment;

/// The namespaced APIs of everything a VoiceDeployment makes, read through the
/// owned-object cache ([`crate::observed`]) so that an unchanged object costs no
/// request.
pub(super) struct Apis<'a> {
    ctx: &'a Context,
    namespace: String,
    service_account: Api<ServiceAccount>,
    pub(super) config_map: Api<ConfigMap>,
    service: Api<Service>,
    pdb: Api<PodDisruptionBudget>,
    ingress: Api<Ingress>,
    hpa: Api<HorizontalPodAutoscaler>,
    deployment: Api<Deployment>,
}

impl<'a> Apis<'a> {
    pub(super) fn new(ctx: &'a Context, ns: &str) -> Self {
        let client = &ctx.client;
        Self {
            ctx,
            namespace: ns.to_string(),
            service_account: Api::namespaced(client.clone(), ns),
            config_map: Api::namespaced(client.clone(), ns),
            service: Api::namespaced(client.clone(), ns),
            pdb: Api::namespaced(client.clone(), ns),
            ingress: Api::namespaced(client.clone(), ns),
            hpa: Api::namespaced(client.clone(), ns),
            deployment: Api::namespaced(client.clone(), ns),
        }
    }

    /// The desired objects that exist under someone else's ownership ("Kind name").
    pub(super) async fn foreign(&self, desired: &DesiredObjects) -> Result<Vec<String>> {
        let o = &self.ctx.observed;
        let mut out = Vec::new();
        out.extend(foreign_observed(&self.service_account, &desired.service_account, o).await?);
        out.extend(foreign_observed(&self.config_map, &desired.config.config_map, o).await?);
        out.extend(foreign_observed(&self.service, &desired.service, o).await?);
        out.extend(foreign_observed(&self.pdb, &desired.pdb, o).await?);
        if let Some(ing) = &desired.ingress {
            out.extend(foreign_observed(&self.ingress, ing, o).await?);
        }
        if let Some(hpa) = &desired.hpa {
            out.extend(foreign_observed(&self.hpa, hpa, o).await?);
        }
        out.extend(foreign_observed(&self.deployment, &desired.deployment, o).await?);
        Ok(out)
    }

    /// [`apply_changed`] with this deployment's cache and metrics.
    async fn apply<K>(&self, api: &Api<K>, obj: &K) -> Result<Option<K>>
    where
        K: kube::Resource<DynamicType = ()>
            + serde::Serialize
            + serde::de::DeserializeOwned
            + Clone
            + std::fmt::Debug,
    {
        apply_changed(api, obj, &self.ctx.observed, &self.ctx.metrics).await
    }

    /// Deletes `name` when this deployment controls it. Only objects the owned-object
    /// cache shows are candidates: an object without the operator's labels is not
    /// one it made (and costs no GET on every reconcile).
    async fn delete_owned<K>(&self, api: &Api<K>, name: &str, vd: &VoiceDeployment) -> Result<()>
    where
        K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned + Clone + std::fmt::Debug,
    {
        let key = ObjKey::new::<K>(&self.namespace, name);
        let Some(meta) = self.ctx.observed.meta(&key) else {
            return Ok(());
        };
        let uid = vd.meta().uid.as_deref();
        let ours = meta
            .owner_references
            .iter()
            .flatten()
            .any(|o| Some(o.uid.as_str()) == uid);
        if ours {
            delete_if_exists(api, name).await
        } else {
            Ok(())
        }
    }

    /// Applies the desired set (checked by [`Apis::foreign`] first). With `blocked`
    /// the Deployment and HPA are left as they are. Returns the Deployment.
    pub(super) async fn apply_all(
        &self,
        desired: &DesiredObjects,
        vd: &VoiceDeployment,
        blocked: bool,
    ) -> Result<Option<Deployment>> {
        let name = vd.name_any();
        self.apply(&self.service_account, &desired.service_account)
            .await?;
        self.apply(&self.config_map, &desired.config.config_map)
            .await?;
        self.apply(&self.service, &desired.service).await?;
        self.apply(&self.pdb, &desired.pdb).await?;
        match &desired.ingress {
            Some(ing) => drop(self.apply(&self.ingress, ing).await?),
            None => self.delete_owned(&self.ingress, &name, vd).await?,
        }
        if blocked {
            return self.ctx.deployment(&self.namespace, &name).await;
        }
        match &desired.hpa {
            Some(hpa) => drop(self.apply(&self.hpa, hpa).await?),
            None => self.delete_owned(&self.hpa, &name, vd).await?,
        }
        let replicas_sent = desired
            .deployment
            .spec
            .as_ref()
            .is_some_and(|s| s.replicas.is_some());
        if !replicas_sent {
            self.hand_over_replicas(&name).await?;
        }
        let deployment = match self.apply(&self.deployment, &desired.deployment).await? {
            Some(written) => written,
            // Unchanged: the cache holds it (that is how it is known unchanged).
            None => match self.ctx.deployment(&self.namespace, &name).await? {
                Some(d) => d,
                None => return Ok(None),
            },
        };
        if rollout_complete(&deployment) {
            // Pods of older operator versions mounted `<vd>-routes`; once none is left,
            // it is garbage (deleting it earlier would break those pods' volume).
            self.delete_owned(&self.config_map, &legacy_routes_config_map_name(&name), vd)
                .await?;
        }
        Ok(Some(deployment))
    }

    /// Before the operator's apply stops sending `spec.replicas` (the CPU policy's
    /// HPA takes the field over), the current count is applied once under a second
    /// field manager: server-side apply then keeps the field (it still has an owner)
    /// instead of removing it, which would reset the Deployment to 1 replica.
    async fn hand_over_replicas(&self, name: &str) -> Result<()> {
        let Some(existing) = self.ctx.deployment(&self.namespace, name).await? else {
            return Ok(());
        };
        let Some(current) = existing.spec.as_ref().and_then(|s| s.replicas) else {
            return Ok(());
        };
        if !owns_replicas(&existing, FIELD_MANAGER) {
            return Ok(());
        }
        let body = serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": name },
            "spec": { "replicas": current },
        });
        let params = PatchParams::apply(HANDOVER_FIELD_MANAGER).force();
        self.deployment
            .patch(name, &params, &Patch::Apply(&body))
            .await?;
        tracing::info!(deployment = %name, replicas = current, "handed spec.replicas over before the HPA takes it");
        Ok(())
    }
}

/// Whether `manager`'s server-side apply owns the Deployment's `spec.replicas`.
pub fn owns_replicas(deployment: &Deployment, manager: &str) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.manager.as_deref() == Some(manager) && m.operation.as_deref() == Some("Apply")
        })
        .any(|m| {
            m.fields_v1.as_ref().is_some_and(|f| {
                f.0.get("f:spec")
                    .and_then(|s| s.get("f:replicas"))
                    .is_some()
            })
        })
}

/// Whether every pod of `d` runs its current template (no old ReplicaSet's pods left).
pub(super) fn rollout_complete(d: &Deployment) -> bool {
    let Some(status) = &d.status else {
        return false;
    };
    status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
        && status.updated_replicas.unwrap_or(0) == status.replicas.unwrap_or(0)
}
