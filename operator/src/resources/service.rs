//! The Service in front of the voice pods: `http` (8080) for Twilio and the API,
//! `metrics` (9090) for Prometheus. Labels and annotations let a ServiceMonitor or
//! annotation-based scrape config find it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{BuildError, HTTP_PORT, METRICS_PORT, name_ns, owned_meta, selector_labels};
use callmeback_api::VoiceDeployment;

/// The voice pods' Service.
pub fn service(vd: &VoiceDeployment) -> Result<Service, BuildError> {
    let (name, _) = name_ns(vd)?;
    let mut meta = owned_meta(vd, name.clone())?;
    meta.annotations = Some(BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]));
    let port = |port_name: &str, port: i32| ServicePort {
        name: Some(port_name.into()),
        port,
        target_port: Some(IntOrString::String(port_name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    Ok(Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![port("http", HTTP_PORT), port("metrics", METRICS_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}
