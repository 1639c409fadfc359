//! The deployment files in `deploy/`: the Kubernetes manifests pass a real schema
//! validator (`kubernetes-validate`, PyPI), the ConfigMap's configuration starts the real
//! binary, the compose file and the Dockerfile hold together with the rest of the tree.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Sluice;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of `path`, as JSON (through PyYAML).
fn yaml(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn have_pyyaml() -> bool {
    common::python_has("yaml", "CI_REQUIRE_DEPLOY_TOOLS")
}

#[test]
fn kubernetes_manifests_are_valid_and_their_configuration_runs() {
    let manifest = root().join("deploy/k8s/sluice.yaml");
    match Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&manifest)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => {
            assert!(
                std::env::var_os("CI_REQUIRE_DEPLOY_TOOLS").is_none(),
                "kubernetes-validate is required in CI (pip install kubernetes-validate)"
            );
            eprintln!("skipped the schema check: kubernetes-validate is not installed");
        }
    }
    if !have_pyyaml() {
        return;
    }
    let documents = yaml(&manifest);
    let named = |k: &str, name: &str| {
        documents
            .iter()
            .find(|d| d["kind"] == k && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {k} {name}"))
    };
    let kind = |k: &str| named(k, "sluice");
    let pod = &kind("StatefulSet")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() >= 60);
    assert_eq!(
        kind("StatefulSet")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"],
        "/metrics"
    );
    let service_ports: Vec<i64> = kind("Service")["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(service_ports, [1883, 8083, 8080, 5433]);

    // The ConfigMap's configuration is one the real binary accepts (addresses moved to
    // port 0 on loopback by the flags, which override the file).
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    let text = kind("ConfigMap")["data"]["sluice.toml"].as_str().unwrap();
    // The file's other listeners move to loopback port 0 too: tests listen nowhere else.
    let text = text
        .replace("/var/lib/sluice", "")
        .replace("0.0.0.0:8083", "127.0.0.1:0");
    std::fs::write(&config, text).unwrap();
    let sluice = Sluice::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    assert_eq!(sluice.get("/ready").0, 200);
    assert!(sluice.ws.is_some(), "the WebSocket listener is on");
    assert!(sluice.terminate().success());
}

#[test]
fn the_compose_file_and_the_dockerfile_hold_together() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert_eq!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        2,
        "multi-stage"
    );
    assert!(dockerfile.contains("\nUSER 10001"), "non-root");
    assert!(dockerfile.contains("VOLUME /var/lib/sluice"));
    assert!(
        dockerfile.contains("http://127.0.0.1:8080/ready"),
        "health check on /ready"
    );
    for variable in [
        "SLUICE_DATA_DIR",
        "SLUICE_MQTT_ADDR",
        "SLUICE_MQTT__WS__ADDR",
        "SLUICE_HTTP_ADDR",
        "SLUICE_PG_ADDR",
    ] {
        assert!(dockerfile.contains(variable), "{variable}");
    }
    if !have_pyyaml() {
        return;
    }
    let deploy = root().join("deploy");
    let compose = &yaml(&deploy.join("compose.yaml"))[0];
    let services = compose["services"].as_object().unwrap();
    for name in ["sluice", "prometheus", "grafana", "loadgen"] {
        assert!(services.contains_key(name), "{name}");
    }
    assert_eq!(compose["services"]["loadgen"]["profiles"][0], "load");
    assert_eq!(
        compose["services"]["sluice"]["build"]["dockerfile"],
        "deploy/Dockerfile"
    );
    // Every file or folder the services mount exists.
    for service in services.values() {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(deploy.join(source).exists(), "{source}");
            }
        }
    }
    // Prometheus scrapes sluice where it listens; Grafana's data sources are the ones the
    // dashboards name.
    let prometheus = &yaml(&deploy.join("prometheus.yml"))[0];
    assert_eq!(
        prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0],
        "sluice:8080"
    );
    let sources = &yaml(&root().join("dashboards/provisioning/datasources/sluice.yaml"))[0];
    let uids: Vec<&str> = sources["datasources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["uid"].as_str().unwrap())
        .collect();
    for file in std::fs::read_dir(root().join("dashboards/json")).unwrap() {
        let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
        let dashboard: Value = serde_json::from_str(&text).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            let uid = panel["datasource"]["uid"].as_str().unwrap();
            assert!(uids.contains(&uid), "{uid} is not provisioned");
        }
    }
}
