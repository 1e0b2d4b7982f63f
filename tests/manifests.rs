//! The Kubernetes manifests under `deploy/k8s/`: valid against the
//! Kubernetes schemas (offline, `kubernetes-validate`), and consistent with
//! what `kawka` serves and reads: probe paths, ports, args, config paths,
//! every config/connector/schema file mounted where the config expects it.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value as Yaml;

fn k8s() -> PathBuf {
    support::project_root().join("deploy/k8s")
}

fn documents(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

fn str_of(value: &Yaml) -> &str {
    value.as_str().unwrap_or_default()
}

fn kawka_deployment() -> Yaml {
    documents(&k8s().join("base/deployment.yaml")).remove(0)
}

fn kawka_container(deployment: &Yaml) -> &Yaml {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

#[test]
fn every_manifest_is_valid_against_the_kubernetes_schemas() {
    let mut files = Vec::new();
    yaml_files(&k8s(), &mut files);
    files.sort();
    let mut resources = Vec::new();
    for file in &files {
        let docs = documents(file);
        assert!(!docs.is_empty(), "{} is empty", file.display());
        let kustomization = docs.iter().any(|d| str_of(&d["kind"]) == "Kustomization");
        if kustomization {
            // Every file a kustomization names exists.
            let dir = file.parent().expect("parent");
            for doc in &docs {
                for key in ["resources", "patches"] {
                    for entry in doc[key].as_sequence().into_iter().flatten() {
                        let path = entry.as_str().or_else(|| entry["path"].as_str()).expect("a path");
                        assert!(dir.join(path).exists(), "{} names missing {path}", file.display());
                    }
                }
            }
            continue;
        }
        // Patches are partial resources; the kustomization checks they exist.
        if file.file_name().is_some_and(|n| n.to_string_lossy().ends_with("-patch.yaml")) {
            continue;
        }
        resources.push(file.clone());
    }
    assert_valid(&resources, 5);
}

/// Kinds of custom resources the manifests use, which `kubernetes-validate`
/// has no schema for offline: KEDA's ScaledObject and Prometheus Operator's
/// PrometheusRule (the alert rules, checked by tests/monitoring.rs).
const CUSTOM_KINDS: [&str; 2] = ["ScaledObject", "PrometheusRule"];

/// Runs `kubernetes-validate --strict` on `files`: no error, warnings only
/// for the [`CUSTOM_KINDS`], at least `resources` passed.
fn assert_valid(files: &[PathBuf], resources: usize) {
    let validator = support::python().with_file_name("kubernetes-validate");
    let output =
        Command::new(&validator).arg("--strict").args(files).output().unwrap_or_else(|e| {
            panic!("cannot run {} (deploy/local/install.sh installs it): {e}", validator.display())
        });
    let report = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    for line in report.lines() {
        assert!(!line.starts_with("ERROR"), "{line}\n{report}");
        if line.starts_with("WARN") {
            assert!(
                CUSTOM_KINDS.iter().any(|kind| line.contains(&format!("kind {kind} "))),
                "only custom resources lack a schema: {line}"
            );
        }
    }
    let passed = report.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert!(passed >= resources, "expected every resource to pass:\n{report}");
}

#[test]
fn probes_ports_and_args_match_what_kawka_serves() {
    let deployment = kawka_deployment();
    let container = kawka_container(&deployment);
    let args: Vec<&str> = container["args"].as_sequence().expect("args").iter().map(str_of).collect();
    assert_eq!(args, ["run", "--config", "/etc/kawka/config/kawka.yaml"]);
    assert_eq!(str_of(&container["workingDir"]), "/etc/kawka", "connectors/ and schemas/ are relative to it");
    let port = container["ports"][0]["containerPort"].as_u64().expect("port");

    // The listen address comes from the env ConfigMap through the config file.
    let kustomization = documents(&k8s().join("base/kustomization.yaml")).remove(0);
    let env: BTreeMap<String, String> = kustomization["configMapGenerator"]
        .as_sequence()
        .expect("generators")
        .iter()
        .find(|g| str_of(&g["name"]) == "kawka-env")
        .expect("kawka-env")["literals"]
        .as_sequence()
        .expect("literals")
        .iter()
        .filter_map(|l| str_of(l).split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    assert_eq!(env.get("KAWKA_HTTP_LISTEN").map(String::as_str), Some(format!("0.0.0.0:{port}").as_str()));
    let config = std::fs::read_to_string(support::project_root().join("config/kawka.yaml")).expect("config");
    assert!(config.contains("listen: ${KAWKA_HTTP_LISTEN"), "the config reads the listen address from the env");

    // Probe paths answer on a real kawka HTTP server (200 or 503, never 404).
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let daemon = std::sync::Arc::new(kawka::http::Daemon {
            connectors: Default::default(),
            registry: None,
            token: None,
            loopback: true,
            rebuilds: None,
            reloads: None,
            runtimes: Default::default(),
        });
        tokio::spawn(kawka::http::serve(listener, daemon, std::future::pending()));
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let path = str_of(&container[probe]["httpGet"]["path"]);
            assert_eq!(str_of(&container[probe]["httpGet"]["port"]), "http", "{probe} uses the named port");
            let status = reqwest::get(format!("http://{address}{path}")).await.expect("probe").status().as_u16();
            assert!(status == 200 || status == 503, "{probe} {path} answered {status}");
        }
        let metrics = reqwest::get(format!("http://{address}/metrics")).await.expect("metrics");
        assert_eq!(metrics.status().as_u16(), 200);
    });
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(str_of(&annotations["prometheus.io/path"]), "/metrics");
    assert_eq!(str_of(&annotations["prometheus.io/port"]), port.to_string());

    // Secrets come from a Secret, never from a ConfigMap literal.
    let secret_env: Vec<&str> = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .filter(|e| !e["valueFrom"]["secretKeyRef"].is_null())
        .map(|e| str_of(&e["name"]))
        .collect();
    assert!(secret_env.contains(&"DATABASE_URL"), "{secret_env:?}");
    assert!(!env.contains_key("DATABASE_URL"));
    // Non-root with a read-only root filesystem, like the image.
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let dockerfile =
        std::fs::read_to_string(support::project_root().join("deploy/docker/Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains("USER 10001"), "the image runs as the uid the manifests require");
    assert!(dockerfile.contains("WORKDIR /etc/kawka"));
    assert!(dockerfile.contains(r#"CMD ["run", "--config", "/etc/kawka/config/kawka.yaml"]"#));
}

/// Rebuilds the pod's /etc/kawka from the generators and volume items, and
/// runs `kawka validate` in it: every file the config needs is mounted
/// where the config looks.
#[test]
fn the_mounted_files_are_a_valid_kawka_configuration() {
    let kustomization = documents(&k8s().join("base/kustomization.yaml")).remove(0);
    let generators: BTreeMap<String, Vec<(String, PathBuf)>> = kustomization["configMapGenerator"]
        .as_sequence()
        .expect("generators")
        .iter()
        .map(|g| {
            let files = g["files"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|f| {
                    let (key, path) = str_of(f).split_once('=').expect("key=path");
                    (key.to_string(), k8s().join("base").join(path))
                })
                .collect();
            (str_of(&g["name"]).to_string(), files)
        })
        .collect();
    // Every shipped file is in a generator.
    let mut shipped = Vec::new();
    for dir in ["config", "connectors", "schemas"] {
        let mut files = Vec::new();
        collect(&support::project_root().join(dir), &mut files);
        shipped.extend(files);
    }
    let generated: Vec<PathBuf> =
        generators.values().flatten().map(|(_, p)| p.canonicalize().expect("generated file exists")).collect();
    for file in &shipped {
        assert!(generated.contains(&file.canonicalize().expect("file")), "{} is not in any ConfigMap", file.display());
    }

    let deployment = kawka_deployment();
    let pod = &deployment["spec"]["template"]["spec"];
    let root = tempfile::tempdir().expect("temp dir");
    let working_dir = str_of(&kawka_container(&deployment)["workingDir"]).to_string();
    for mount in kawka_container(&deployment)["volumeMounts"].as_sequence().expect("mounts") {
        let volume = pod["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mounted volume");
        let config_map = str_of(&volume["configMap"]["name"]);
        let files = &generators[config_map];
        let relative = str_of(&mount["mountPath"]).strip_prefix(&working_dir).expect("mounted under workingDir");
        let target = root.path().join(relative.trim_start_matches('/'));
        let items = volume["configMap"]["items"].as_sequence();
        if let Some(items) = items {
            assert_eq!(items.len(), files.len(), "{config_map}: every key has an item");
        }
        for (key, source) in files {
            let path = match items {
                Some(items) => {
                    str_of(&items.iter().find(|i| str_of(&i["key"]) == key).expect("an item per key")["path"])
                        .to_string()
                }
                None => key.clone(),
            };
            let destination = target.join(path);
            std::fs::create_dir_all(destination.parent().expect("parent")).expect("mkdir");
            std::fs::copy(source, &destination).expect("copy");
        }
    }
    // With the pod's environment: listening on 0.0.0.0 needs the token the
    // Secret gives (required, not optional); without it kawka refuses.
    let validate = |token: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kawka"));
        command
            .args(["validate", "--config", "/etc/kawka/config/kawka.yaml".trim_start_matches("/etc/kawka/")])
            .current_dir(root.path())
            .env_remove("KAWKA_CONFIG")
            .env("KAWKA_HTTP_LISTEN", "0.0.0.0:8080")
            .env_remove("KAWKA_HTTP_TOKEN");
        if let Some(token) = token {
            command.env("KAWKA_HTTP_TOKEN", token);
        }
        let output = command.output().expect("kawka validate");
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };
    let (ok, text) = validate(Some("a-token-from-the-secret"));
    assert!(ok, "{text}");
    let (ok, text) = validate(None);
    assert!(!ok && text.contains("http.token"), "{text}");
    let token = container_env(&deployment, "KAWKA_HTTP_TOKEN");
    assert_eq!(str_of(&token["valueFrom"]["secretKeyRef"]["name"]), "kawka-credentials");
    assert!(token["valueFrom"]["secretKeyRef"]["optional"].is_null(), "the token is required: {token:?}");
}

fn container_env<'a>(deployment: &'a Yaml, name: &str) -> &'a Yaml {
    kawka_container(deployment)["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| str_of(&e["name"]) == name)
        .unwrap_or_else(|| panic!("no env {name}"))
}

/// `kubectl kustomize` (kustomize built into kubectl) of the production
/// overlay: every resource valid against the Kubernetes schemas, offline,
/// the NetworkPolicies in it, and every credential required.
#[test]
fn the_production_overlay_builds_with_its_network_policies_and_validates() {
    let text = support::kustomize("production");
    let docs = support::yaml_documents(&text);
    let of_kind = |kind: &str| docs.iter().filter(|d| str_of(&d["kind"]) == kind).collect::<Vec<_>>();
    // Connectors and the catalogue keep their names, so an update changes
    // the mounted files in place (the pods reload them; no rollout); the
    // daemon file is hashed (a change rolls the pods).
    let config_maps: Vec<&str> = of_kind("ConfigMap").iter().map(|m| str_of(&m["metadata"]["name"])).collect();
    assert!(config_maps.contains(&"kawka-connectors") && config_maps.contains(&"kawka-schemas"), "{config_maps:?}");
    assert!(config_maps.iter().any(|n| n.starts_with("kawka-config-")), "{config_maps:?}");
    assert!(!text.contains("subPath"), "subPath mounts never see ConfigMap updates");
    let policies = of_kind("NetworkPolicy");
    assert_eq!(policies.len(), 2, "{text}");
    for policy in &policies {
        assert_eq!(str_of(&policy["metadata"]["namespace"]), "kawka");
    }
    let kawka_policy = policies.iter().find(|p| str_of(&p["metadata"]["name"]) == "kawka").expect("kawka's policy");
    let from = &kawka_policy["spec"]["ingress"][0]["from"];
    assert_eq!(from.as_sequence().map(Vec::len), Some(1), "only the monitoring namespace");
    assert_eq!(str_of(&from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]), "monitoring");
    let registry_policy =
        policies.iter().find(|p| str_of(&p["metadata"]["name"]) == "kawka-registry").expect("the registry's policy");
    assert_eq!(registry_policy["spec"]["ingress"][0]["ports"][0]["port"].as_u64(), Some(8081));
    // Every secretKeyRef of the built Deployments is required.
    let mut refs = 0;
    for deployment in of_kind("Deployment") {
        for container in deployment["spec"]["template"]["spec"]["containers"].as_sequence().expect("containers") {
            for env in container["env"].as_sequence().into_iter().flatten() {
                let reference = &env["valueFrom"]["secretKeyRef"];
                if !reference.is_null() {
                    refs += 1;
                    assert!(reference["optional"].is_null() || reference["optional"] == false, "{env:?}");
                }
            }
        }
    }
    assert!(refs >= 6, "{refs} secret references");
    let registry = of_kind("Deployment")
        .into_iter()
        .find(|d| str_of(&d["metadata"]["name"]) == "kawka-registry")
        .expect("the registry");
    let env = &registry["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(env.as_sequence().expect("env").iter().any(|e| str_of(&e["name"]) == "KAWKA_REGISTRY_AUTH"));

    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), &text).expect("write");
    let custom = docs.iter().filter(|d| CUSTOM_KINDS.contains(&str_of(&d["kind"]))).count();
    assert_eq!(custom, CUSTOM_KINDS.len(), "the KEDA ScaledObject and the PrometheusRule are in the overlay");
    assert_valid(&[file.path().to_path_buf()], docs.len() - custom);
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect(&path, out);
        } else {
            out.push(path);
        }
    }
}
