//! The optional Ingress: `publicUrl`'s host (or `ingress.host`) to the Service's
//! `http` port, TLS when a secret is named. WebSocket timeouts are controller
//! specific, so they come through `ingress.annotations`.

use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec as K8sIngressSpec, IngressTLS, ServiceBackendPort,
};

use super::{BuildError, name_ns, owned_meta};
use crate::crd::VoiceDeployment;

/// The host part of an `http(s)://host[:port]/path` URL.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host = host.split(':').next()?;
    (!host.is_empty()).then(|| host.to_string())
}

/// The Ingress, when `spec.ingress` is set.
pub fn ingress(vd: &VoiceDeployment) -> Result<Option<Ingress>, BuildError> {
    let Some(spec) = &vd.spec.ingress else {
        return Ok(None);
    };
    let (name, _) = name_ns(vd)?;
    let host = spec.host.clone().or_else(|| url_host(&vd.spec.public_url));
    let mut meta = owned_meta(vd, name.clone())?;
    if !spec.annotations.is_empty() {
        meta.annotations = Some(spec.annotations.clone());
    }
    Ok(Some(Ingress {
        metadata: meta,
        spec: Some(K8sIngressSpec {
            ingress_class_name: spec.class_name.clone(),
            tls: spec.tls_secret_name.as_ref().map(|secret| {
                vec![IngressTLS {
                    hosts: host.clone().map(|h| vec![h]),
                    secret_name: Some(secret.clone()),
                }]
            }),
            rules: Some(vec![IngressRule {
                host,
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".into()),
                        path_type: "Prefix".into(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name,
                                port: Some(ServiceBackendPort {
                                    name: Some("http".into()),
                                    number: None,
                                }),
                            }),
                            resource: None,
                        },
                    }],
                }),
            }]),
            default_backend: None,
        }),
        status: None,
    }))
}
