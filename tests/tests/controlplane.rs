//! Proves the test control plane (tests/src/controlplane.rs) is the real
//! Kubernetes API: CRD structural schemas with CEL rules, server-side apply
//! field ownership, the controller-manager's deployment, replicaset and
//! garbage-collector controllers, and RBAC for ServiceAccount tokens and
//! users. Only `kube::Client` is used.

use std::time::Duration;

use callmeback_tests::controlplane;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

/// How long a controller gets to act before a test gives up.
const CONTROLLER_DEADLINE: Duration = Duration::from_secs(60);

/// Polls `check` every 100 ms until it yields a value or `deadline` passes.
async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn api_status(result: Result<impl std::fmt::Debug, kube::Error>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error status, got {other:?}"),
    }
}

#[tokio::test]
async fn crd_cel_rule_rejects_a_violating_custom_resource_with_the_apiserver_message() {
    // Proves CRDs get real structural-schema and CEL (x-kubernetes-validations) enforcement.
    let cp = controlplane::shared().await;
    let ns = cp.new_namespace("crd-cel").await;
    let client = cp.client();
    // CRDs are cluster-scoped: a group per namespace keeps reruns and
    // parallel binaries on a shared e2e cluster apart.
    let group = format!("{ns}.test.callmeback.dev");
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": format!("widgets.{group}") },
        "spec": {
            "group": group,
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList" },
            "scope": "Namespaced",
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": {
                        "type": "object",
                        "required": ["replicas", "maxReplicas"],
                        "properties": {
                            "replicas": { "type": "integer", "minimum": 0 },
                            "maxReplicas": { "type": "integer" }
                        },
                        "x-kubernetes-validations": [{
                            "rule": "self.replicas <= self.maxReplicas",
                            "message": "replicas must not exceed maxReplicas"
                        }]
                    }}
                }}
            }]
        }
    }))
    .expect("valid CRD");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    let crd_name = format!("widgets.{group}");
    eventually("the CRD to be Established", CONTROLLER_DEADLINE, || {
        let crds = crds.clone();
        let crd_name = crd_name.clone();
        async move {
            let crd = crds.get(&crd_name).await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        }
    })
    .await;

    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, "v1", "Widget"));
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let widget = |name: &str, replicas: i64, max: i64| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": format!("{group}/v1"),
            "kind": "Widget",
            "metadata": { "name": name },
            "spec": { "replicas": replicas, "maxReplicas": max }
        }))
        .expect("valid widget")
    };

    // Established can precede the handler serving the new resource by a moment.
    eventually("a valid Widget to be accepted", CONTROLLER_DEADLINE, || {
        let widgets = widgets.clone();
        let valid = widget("valid", 2, 3);
        async move {
            widgets
                .create(&PostParams::default(), &valid)
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;

    let status = api_status(
        widgets
            .create(&PostParams::default(), &widget("too-many", 5, 3))
            .await,
    );
    assert_eq!(status.code, 422, "{status:?}");
    assert_eq!(status.reason, "Invalid", "{status:?}");
    assert!(
        status
            .message
            .contains("replicas must not exceed maxReplicas"),
        "the CEL rule's message is in {:?}",
        status.message
    );

    // The structural schema's own checks apply as well.
    let status = api_status(
        widgets
            .create(&PostParams::default(), &widget("negative", -1, 3))
            .await,
    );
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("spec.replicas"),
        "{:?}",
        status.message
    );

    crds.delete(&crd_name, &DeleteParams::default())
        .await
        .expect("delete CRD");
}

#[tokio::test]
async fn server_side_apply_removes_fields_a_manager_drops_and_refuses_unforced_conflicts() {
    // Proves server-side apply tracks field ownership per manager, as the operator relies on.
    let cp = controlplane::shared().await;
    let ns = cp.new_namespace("ssa").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(cp.client(), &ns);
    let apply = |data: serde_json::Value| {
        Patch::Apply(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": "settings" },
            "data": data
        }))
    };

    config_maps
        .patch(
            "settings",
            &PatchParams::apply("alpha"),
            &apply(json!({ "owned-by-alpha": "1", "shared": "alpha" })),
        )
        .await
        .expect("alpha applies");
    config_maps
        .patch(
            "settings",
            &PatchParams::apply("beta"),
            &apply(json!({ "owned-by-beta": "2" })),
        )
        .await
        .expect("beta applies");

    // alpha's next apply no longer mentions a field it owned: it is removed,
    // while beta's field stays.
    let after = config_maps
        .patch(
            "settings",
            &PatchParams::apply("alpha"),
            &apply(json!({ "shared": "alpha" })),
        )
        .await
        .expect("alpha re-applies without its field");
    let data = after.data.expect("data");
    assert!(!data.contains_key("owned-by-alpha"), "{data:?}");
    assert_eq!(data.get("owned-by-beta").map(String::as_str), Some("2"));
    assert_eq!(data.get("shared").map(String::as_str), Some("alpha"));

    // beta claiming a value alpha owns conflicts unless forced.
    let status = api_status(
        config_maps
            .patch(
                "settings",
                &PatchParams::apply("beta"),
                &apply(json!({ "owned-by-beta": "2", "shared": "beta" })),
            )
            .await,
    );
    assert_eq!(status.code, 409, "{status:?}");
    assert!(status.message.contains("alpha"), "{:?}", status.message);

    let forced = config_maps
        .patch(
            "settings",
            &PatchParams::apply("beta").force(),
            &apply(json!({ "owned-by-beta": "2", "shared": "beta" })),
        )
        .await
        .expect("forced apply takes ownership");
    assert_eq!(
        forced
            .data
            .as_ref()
            .and_then(|d| d.get("shared"))
            .map(String::as_str),
        Some("beta")
    );
    let managers: Vec<String> = forced
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|entry| {
            entry
                .fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:shared"))
        })
        .filter_map(|entry| entry.manager)
        .collect();
    assert_eq!(
        managers,
        vec!["beta".to_owned()],
        "sole owner of data.shared"
    );
}

#[tokio::test]
async fn deployment_gets_a_replicaset_and_deleting_the_deployment_garbage_collects_it() {
    // Proves the controller-manager runs: deployment and replicaset controllers act, the GC collects dependents.
    let cp = controlplane::shared().await;
    let ns = cp.new_namespace("deploy-gc").await;
    let client = cp.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                // Only the API objects matter here; the image need not exist.
                "spec": { "containers": [{ "name": "web", "image": "registry.invalid/web:1" }] }
            }
        }
    }))
    .expect("valid deployment");
    let created = deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    let deployment_uid = created.metadata.uid.expect("uid");

    let replica_set = eventually(
        "a ReplicaSet owned by the Deployment",
        CONTROLLER_DEADLINE,
        || {
            let replica_sets = replica_sets.clone();
            let deployment_uid = deployment_uid.clone();
            async move {
                replica_sets
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|rs| {
                        rs.metadata.owner_references.iter().flatten().any(|o| {
                            o.uid == deployment_uid
                                && o.kind == "Deployment"
                                && o.controller == Some(true)
                        })
                    })
            }
        },
    )
    .await;
    let replica_set_name = replica_set.metadata.name.clone().expect("name");
    let replica_set_uid = replica_set.metadata.uid.clone().expect("uid");

    eventually("the ReplicaSet's pod", CONTROLLER_DEADLINE, || {
        let pods = pods.clone();
        let replica_set_uid = replica_set_uid.clone();
        async move {
            pods.list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|pod| {
                    pod.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.uid == replica_set_uid)
                })
                .map(|_| ())
        }
    })
    .await;

    deployments
        .delete("web", &DeleteParams::background())
        .await
        .expect("delete deployment");
    eventually(
        "the garbage collector to delete the ReplicaSet and its pod",
        CONTROLLER_DEADLINE,
        || {
            let replica_sets = replica_sets.clone();
            let pods = pods.clone();
            let replica_set_name = replica_set_name.clone();
            async move {
                let rs_gone = replica_sets
                    .get_opt(&replica_set_name)
                    .await
                    .ok()?
                    .is_none();
                // A scheduled pod is gone only once its kubelet (here kwok)
                // confirms the deletion; an unscheduled one goes at once.
                let pods_gone = pods
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .is_empty();
                (rs_gone && pods_gone).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn deployment_becomes_available_with_running_ready_pods_on_the_fake_node() {
    // Proves scheduler + kwok complete the pod lifecycle, so the operator can observe Available.
    let cp = controlplane::shared().await;
    assert!(
        cp.pods_run(),
        "this control plane runs no pods: build it with scripts/controlplane-build.sh (kube-scheduler + kwok)"
    );
    let ns = cp.new_namespace("available").await;
    let client = cp.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "echo" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "echo" } },
            "template": {
                "metadata": { "labels": { "app": "echo" } },
                "spec": {
                    // A real, tiny image, so the test also holds on a real cluster.
                    "containers": [{
                        "name": "echo",
                        "image": "registry.k8s.io/pause:3.10"
                    }]
                }
            }
        }
    }))
    .expect("valid deployment");
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");

    let status = eventually(
        "the Deployment to report 2 available replicas",
        CONTROLLER_DEADLINE,
        || {
            let deployments = deployments.clone();
            async move {
                let status = deployments.get("echo").await.ok()?.status?;
                (status.available_replicas == Some(2)).then_some(status)
            }
        },
    )
    .await;
    let available = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Available")
        .expect("Available condition");
    assert_eq!(available.status, "True", "{available:?}");

    let pods = Api::<Pod>::namespaced(client, &ns)
        .list(&ListParams::default().labels("app=echo"))
        .await
        .expect("list pods");
    assert_eq!(pods.items.len(), 2);
    for pod in pods.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.expect("pod status");
        assert_eq!(status.phase.as_deref(), Some("Running"), "{name}");
        assert!(
            status.pod_ip.is_some_and(|ip| !ip.is_empty()),
            "{name} has a pod IP"
        );
        if std::env::var_os(controlplane::E2E_KUBECONFIG_ENV).is_none() {
            assert_eq!(
                pod.spec.and_then(|s| s.node_name).as_deref(),
                Some(controlplane::FAKE_NODE_NAME),
                "{name} is scheduled onto the fake node"
            );
        }
    }
}

#[tokio::test]
async fn foreground_deletion_waits_for_dependents_of_any_kind() {
    // Proves owner references work for arbitrary objects (as the operator's ConfigMaps use), with foreground deletion.
    let cp = controlplane::shared().await;
    let ns = cp.new_namespace("gc-foreground").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(cp.client(), &ns);
    let owner = config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "owner" } })).expect("owner"),
        )
        .await
        .expect("create owner");
    let dependent: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": "dependent",
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": "owner",
                "uid": owner.metadata.uid.expect("uid"),
                "blockOwnerDeletion": true
            }]
        }
    }))
    .expect("dependent");
    config_maps
        .create(&PostParams::default(), &dependent)
        .await
        .expect("create dependent");

    config_maps
        .delete("owner", &DeleteParams::foreground())
        .await
        .expect("delete owner");
    eventually(
        "owner and dependent to be gone",
        CONTROLLER_DEADLINE,
        || {
            let config_maps = config_maps.clone();
            async move {
                let owner_gone = config_maps.get_opt("owner").await.ok()?.is_none();
                let dependent_gone = config_maps.get_opt("dependent").await.ok()?.is_none();
                // Foreground: the owner cannot vanish before its blocking dependent.
                assert!(
                    !owner_gone || dependent_gone,
                    "owner deleted before its dependent"
                );
                (owner_gone && dependent_gone).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn service_account_token_with_a_narrow_role_is_forbidden_beyond_it() {
    // Proves TokenRequest tokens authenticate and RBAC confines them to their Role.
    let cp = controlplane::shared().await;
    let ns = cp.new_namespace("rbac-sa").await;
    let other_ns = cp.new_namespace("rbac-sa-other").await;
    let admin = cp.client();
    let sa: ServiceAccount =
        serde_json::from_value(json!({ "metadata": { "name": "reader" } })).expect("sa");
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("create serviceaccount");
    grant(
        &admin,
        &ns,
        "configmap-reader",
        json!([{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"] }]),
        json!({ "kind": "ServiceAccount", "name": "reader", "namespace": ns }),
    )
    .await;

    let reader = cp.client_for_service_account(&ns, "reader").await;
    let readable: Api<ConfigMap> = Api::namespaced(reader.clone(), &ns);
    // RBAC reads bindings from an informer: allow it a moment to see the new one.
    eventually("the Role to take effect", CONTROLLER_DEADLINE, || {
        let readable = readable.clone();
        async move { readable.list(&ListParams::default()).await.ok().map(|_| ()) }
    })
    .await;

    let forbidden = [
        (
            "create a configmap",
            readable
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({ "metadata": { "name": "x" } })).expect("cm"),
                )
                .await
                .map(|_| ()),
        ),
        (
            "list secrets",
            Api::<Secret>::namespaced(reader.clone(), &ns)
                .list(&ListParams::default())
                .await
                .map(|_| ()),
        ),
        (
            "list configmaps in another namespace",
            Api::<ConfigMap>::namespaced(reader.clone(), &other_ns)
                .list(&ListParams::default())
                .await
                .map(|_| ()),
        ),
    ];
    for (action, result) in forbidden {
        let status = api_status(result);
        assert_eq!(status.code, 403, "{action}: {status:?}");
        assert!(
            status
                .message
                .contains(&format!("system:serviceaccount:{ns}:reader")),
            "{action}: the message names the service account: {:?}",
            status.message
        );
    }
}

#[tokio::test]
async fn user_client_is_authorized_by_its_groups_only() {
    // Proves client_for_user authenticates as the given user and groups, so RBAC sees exactly them.
    let cp = controlplane::shared().await;
    let ns = namespace_with_pod_lister(
        cp,
        "rbac-user",
        json!({ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "callmeback:pod-listers" }),
    )
    .await;
    let member = cp.client_for_user("alice", &["callmeback:pod-listers"]);
    until_pods_listable(member, &ns).await;

    let outsider = cp.client_for_user("bob", &["callmeback:others"]);
    assert_forbidden::<Pod>(outsider, &ns, "bob").await;
}

#[tokio::test]
async fn user_client_certificate_from_a_signed_csr_authenticates_as_its_subject_and_is_forbidden_beyond_its_role()
 {
    // Proves client_for_user_certificate mints a real client certificate (CSR approved,
    // signed by the controller-manager): the apiserver reads the user from its CN and the
    // group from its O, and RBAC confines it to its Role.
    let cp = controlplane::shared().await;
    let ns = namespace_with_pod_lister(
        cp,
        "rbac-cert",
        json!({ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "carol" }),
    )
    .await;
    let carol = cp
        .client_for_user_certificate("carol", Some("callmeback:auditors"))
        .await;
    let review = Api::<SelfSubjectReview>::all(carol.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("any authenticated user may ask who it is");
    let user = review
        .status
        .and_then(|status| status.user_info)
        .expect("the review names the user");
    assert_eq!(user.username.as_deref(), Some("carol"));
    let groups = user.groups.unwrap_or_default();
    for group in ["callmeback:auditors", "system:authenticated"] {
        assert!(groups.iter().any(|g| g == group), "{group} in {groups:?}");
    }

    until_pods_listable(carol.clone(), &ns).await;
    assert_forbidden::<Secret>(carol, &ns, "carol").await;
}

/// A fresh namespace in which `subject` may list pods and do nothing else.
async fn namespace_with_pod_lister(
    cp: &controlplane::ControlPlane,
    prefix: &str,
    subject: serde_json::Value,
) -> String {
    let ns = cp.new_namespace(prefix).await;
    grant(
        &cp.client(),
        &ns,
        "pod-lister",
        json!([{ "apiGroups": [""], "resources": ["pods"], "verbs": ["list"] }]),
        subject,
    )
    .await;
    ns
}

/// Waits until `client` may list pods in `ns` (the authorizer's RBAC cache lags a new binding).
async fn until_pods_listable(client: Client, ns: &str) {
    let pods: Api<Pod> = Api::namespaced(client, ns);
    eventually(
        "the RoleBinding to take effect",
        CONTROLLER_DEADLINE,
        || {
            let pods = pods.clone();
            async move { pods.list(&ListParams::default()).await.ok().map(|_| ()) }
        },
    )
    .await;
}

/// Listing `K` in `ns` as `client` is refused with 403 naming `user`.
async fn assert_forbidden<K>(client: Client, ns: &str, user: &str)
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let status = api_status(
        Api::<K>::namespaced(client, ns)
            .list(&ListParams::default())
            .await,
    );
    assert_eq!(status.code, 403, "{status:?}");
    assert!(
        status.message.contains(&format!("\"{user}\"")),
        "{:?}",
        status.message
    );
}

#[tokio::test]
async fn admin_kubeconfig_file_connects_as_cluster_admin() {
    // Proves the written kubeconfig (what helm and kubectl get) is complete and grants admin.
    let cp = controlplane::shared().await;
    let kubeconfig = Kubeconfig::read_from(cp.kubeconfig_path()).expect("readable kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig");
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        cp.server_url()
    );
    let client = Client::try_from(config).expect("client");
    let ns = cp.new_namespace("kubeconfig").await;
    // Creating a ClusterRole-free object in a fresh namespace and reading
    // secrets cluster-wide both need admin rights.
    Api::<Secret>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
        .expect("admin lists secrets in all namespaces");
    Api::<ConfigMap>::namespaced(client, &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "hello" } })).expect("cm"),
        )
        .await
        .expect("admin creates a configmap");
}

/// Creates Role `name` with `rules` in `ns` and binds it to `subject`.
async fn grant(
    admin: &Client,
    ns: &str,
    name: &str,
    rules: serde_json::Value,
    subject: serde_json::Value,
) {
    let role: Role =
        serde_json::from_value(json!({ "metadata": { "name": name }, "rules": rules }))
            .expect("valid role");
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .expect("create role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
        "subjects": [subject]
    }))
    .expect("valid rolebinding");
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("create rolebinding");
}
