//! The optional Ingress: `publicUrl`'s host (or `ingress.host`) to the Service's
//! `http` port, TLS when a secret is named. WebSocket timeouts are controller
//! specific, so they come through `ingress.annotations`, filtered by
//! [`INGRESS_ANNOTATIONS`].
//!
//! Why an allowlist: an ingress controller is shared and privileged. Annotations
//! such as ingress-nginx's `*-snippet` (raw controller configuration; CVE-2021-25742,
//! CVE-2025-1974), `auth-url`, `mirror-target` or `permanent-redirect` have let the
//! author of one Ingress read the controller's credentials or other tenants'
//! traffic. A VoiceDeployment author gets only the keys below, each with a value of
//! a fixed shape; anything else is dropped and reported.

use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec as K8sIngressSpec, IngressTLS, ServiceBackendPort,
};

use std::collections::BTreeMap;

use super::{BuildError, name_ns, owned_meta};
use callmeback_api::VoiceDeployment;

/// The shape an allowed annotation's value must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnnotationValue {
    /// 1 to 6 digits (seconds, counts).
    Number,
    /// Digits with an optional unit letter (`s`, `m`, `h`, `k`, `g`, either case): `3600s`, `8m`.
    Amount,
    /// `true` or `false`.
    Bool,
    /// A Kubernetes object name (lowercase DNS subdomain).
    Name,
    /// Comma-separated CIDRs.
    Cidrs,
    /// One of the listed words.
    OneOf(&'static [&'static str]),
    /// An AWS ACM certificate ARN.
    Arn,
    /// A comma-separated list of lowercase names.
    Names,
}

/// Ingress annotations a VoiceDeployment may set, with their value shapes (the
/// README's "Security" section lists them). Never a `*snippet*`, auth, mirror,
/// redirect or rewrite annotation, nor one joining another tenant's load balancer.
pub const INGRESS_ANNOTATIONS: &[(&str, AnnotationValue)] = &[
    (
        "nginx.ingress.kubernetes.io/proxy-read-timeout",
        AnnotationValue::Number,
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-send-timeout",
        AnnotationValue::Number,
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-connect-timeout",
        AnnotationValue::Number,
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-body-size",
        AnnotationValue::Amount,
    ),
    (
        "nginx.ingress.kubernetes.io/ssl-redirect",
        AnnotationValue::Bool,
    ),
    (
        "nginx.ingress.kubernetes.io/force-ssl-redirect",
        AnnotationValue::Bool,
    ),
    (
        "nginx.ingress.kubernetes.io/limit-rps",
        AnnotationValue::Number,
    ),
    (
        "nginx.ingress.kubernetes.io/limit-connections",
        AnnotationValue::Number,
    ),
    (
        "nginx.ingress.kubernetes.io/whitelist-source-range",
        AnnotationValue::Cidrs,
    ),
    (
        "nginx.ingress.kubernetes.io/allowlist-source-range",
        AnnotationValue::Cidrs,
    ),
    ("haproxy.org/timeout-tunnel", AnnotationValue::Amount),
    (
        "traefik.ingress.kubernetes.io/router.entrypoints",
        AnnotationValue::Names,
    ),
    (
        "traefik.ingress.kubernetes.io/router.tls",
        AnnotationValue::Bool,
    ),
    ("cert-manager.io/cluster-issuer", AnnotationValue::Name),
    ("cert-manager.io/issuer", AnnotationValue::Name),
    (
        "alb.ingress.kubernetes.io/scheme",
        AnnotationValue::OneOf(&["internet-facing", "internal"]),
    ),
    (
        "alb.ingress.kubernetes.io/target-type",
        AnnotationValue::OneOf(&["ip", "instance"]),
    ),
    (
        "alb.ingress.kubernetes.io/certificate-arn",
        AnnotationValue::Arn,
    ),
];

impl AnnotationValue {
    /// Whether `v` has this shape.
    pub fn accepts(self, v: &str) -> bool {
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
        let name = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        match self {
            Self::Number => digits(v),
            Self::Amount => {
                let num = v
                    .strip_suffix(|c: char| "smhkgSMHKG".contains(c))
                    .unwrap_or(v);
                digits(num)
            }
            Self::Bool => v == "true" || v == "false",
            Self::Name => name(v),
            Self::Names => v.len() <= 253 && v.split(',').all(|n| name(n.trim())),
            Self::Cidrs => {
                !v.is_empty()
                    && v.len() <= 1024
                    && v.bytes().all(|b| {
                        b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'/' | b',' | b' ')
                    })
            }
            Self::OneOf(words) => words.contains(&v),
            Self::Arn => {
                v.starts_with("arn:")
                    && v.len() <= 2048
                    && v.bytes().all(|b| {
                        b.is_ascii_alphanumeric()
                            || matches!(b, b':' | b'/' | b'-' | b'_' | b'.' | b',')
                    })
            }
        }
    }
}

/// Whether annotation `key` with `value` may be put on the Ingress.
pub fn annotation_allowed(key: &str, value: &str) -> bool {
    // Belt and braces: a snippet is never allowed, whatever the table says.
    !key.to_ascii_lowercase().contains("snippet")
        && INGRESS_ANNOTATIONS
            .iter()
            .any(|(k, shape)| *k == key && shape.accepts(value))
}

/// The requested annotations split into (allowed, rejected keys).
pub fn split_annotations(
    requested: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut allowed = BTreeMap::new();
    let mut rejected = Vec::new();
    for (k, v) in requested {
        if annotation_allowed(k, v) {
            allowed.insert(k.clone(), v.clone());
        } else {
            rejected.push(k.clone());
        }
    }
    (allowed, rejected)
}

/// Keys of `vd`'s ingress annotations that are not put on the Ingress.
pub fn rejected_annotations(vd: &VoiceDeployment) -> Vec<String> {
    vd.spec
        .ingress
        .as_ref()
        .map(|i| split_annotations(&i.annotations).1)
        .unwrap_or_default()
}

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
    let (annotations, _) = split_annotations(&spec.annotations);
    if !annotations.is_empty() {
        meta.annotations = Some(annotations);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_auth_mirror_and_odd_values_never_reach_the_ingress() {
        // Proves the allowlist: controller-configuration annotations and malformed values are dropped, the listed ones pass.
        let requested: BTreeMap<String, String> = [
            (
                "nginx.ingress.kubernetes.io/configuration-snippet",
                "more_set_headers x;",
            ),
            (
                "nginx.ingress.kubernetes.io/server-snippet",
                "location /x {}",
            ),
            ("nginx.ingress.kubernetes.io/auth-url", "http://10.0.0.1/"),
            ("nginx.ingress.kubernetes.io/mirror-target", "http://evil/"),
            (
                "nginx.ingress.kubernetes.io/permanent-redirect",
                "https://x;}",
            ),
            ("alb.ingress.kubernetes.io/group.name", "other-tenant"),
            ("nginx.ingress.kubernetes.io/proxy-read-timeout", "3600;\n}"),
            ("cert-manager.io/cluster-issuer", "Bad Issuer"),
            ("nginx.ingress.kubernetes.io/proxy-send-timeout", "3600"),
            ("nginx.ingress.kubernetes.io/proxy-body-size", "8m"),
            ("cert-manager.io/cluster-issuer-x", "letsencrypt"),
            ("alb.ingress.kubernetes.io/scheme", "internet-facing"),
            (
                "nginx.ingress.kubernetes.io/whitelist-source-range",
                "10.0.0.0/8, 2001:db8::/32",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (allowed, rejected) = split_annotations(&requested);
        assert_eq!(
            allowed.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "alb.ingress.kubernetes.io/scheme",
                "nginx.ingress.kubernetes.io/proxy-body-size",
                "nginx.ingress.kubernetes.io/proxy-send-timeout",
                "nginx.ingress.kubernetes.io/whitelist-source-range",
            ]
        );
        assert_eq!(rejected.len(), requested.len() - 4);
        // No table entry can ever be a snippet.
        assert!(
            INGRESS_ANNOTATIONS
                .iter()
                .all(|(k, _)| !k.contains("snippet"))
        );
    }
}
