//! `llm-edge -t -c FILE`: validates a config and exits like `nginx -t`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn llm_edge_t(conf: &Path, env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-edge"));
    cmd.arg("-t").arg("-c").arg(conf);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run llm-edge -t")
}

/// Names referenced as `os.environ/NAME` or `${NAME}` in a config text.
fn env_references(text: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("os.environ/") {
        let rest = &text[i + "os.environ/".len()..];
        let name: String = rest.chars().take_while(|&c| is_name(c)).collect();
        if !name.is_empty() {
            names.insert(name);
        }
    }
    for (i, _) in text.match_indices("${") {
        let rest = &text[i + 2..];
        if let Some(end) = rest.find('}') {
            let name = rest[..end].trim();
            if !name.is_empty() && name.chars().all(is_name) {
                names.insert(name.to_string());
            }
        }
    }
    names
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("llm-edge-test-{}-{name}.yaml", std::process::id()));
    std::fs::write(&path, text).expect("write temp config");
    path
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn every_shipped_config_passes_the_test_flag() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read conf/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.yaml in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read config");
        // Dummy secrets: long enough and free of control characters.
        let env: Vec<(String, String)> = env_references(&text)
            .into_iter()
            .map(|name| (name, "test-dummy-secret-value-0000".to_string()))
            .collect();
        let out = llm_edge_t(&file, &env);
        assert!(
            out.status.success(),
            "{} with env {:?}: {}",
            file.display(),
            env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            describe(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("test is successful"),
            "{}: {}",
            file.display(),
            describe(&out)
        );
    }
}

#[test]
fn unknown_key_fails_and_is_named_with_its_path() {
    let file = temp_file(
        "unknown-key",
        r#"
listen: ["127.0.0.1:18080"]
upstreams:
  u:
    kind: vllm
    endpoints: ["http://127.0.0.1:18000"]
    colour: red
models:
  - {name: m, upstream: u}
"#,
    );
    let out = llm_edge_t(&file, &[]);
    let _ = std::fs::remove_file(&file);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("colour"),
        "names the key: {}",
        describe(&out)
    );
    assert!(
        stderr.contains("upstreams.u"),
        "names its path: {}",
        describe(&out)
    );
}

#[test]
fn missing_env_var_fails_and_is_named() {
    let var = "LLM_EDGE_TEST_SURELY_UNSET_KEY";
    let file = temp_file(
        "missing-env",
        &format!(
            r#"
listen: ["127.0.0.1:18080"]
upstreams:
  u:
    kind: openai
    endpoints: ["https://127.0.0.1:18443"]
    keys: [os.environ/{var}]
models:
  - {{name: m, upstream: u}}
"#
        ),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-edge"));
    cmd.arg("-t").arg("-c").arg(&file).env_remove(var);
    let out = cmd.output().expect("run llm-edge -t");
    let _ = std::fs::remove_file(&file);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(var),
        "names the variable: {}",
        describe(&out)
    );
    assert!(
        stderr.contains("upstreams.u.keys[0]"),
        "names where it is used: {}",
        describe(&out)
    );
}

#[test]
fn env_reference_scanner_finds_both_forms() {
    let names = env_references("keys: [os.environ/A_KEY, \"${B_KEY}\", \"Bearer ${ C }\"]");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["A_KEY", "B_KEY", "C"]
    );
}
