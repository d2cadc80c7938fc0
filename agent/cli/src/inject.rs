//! `shoal inject`: offline injection for GitOps and for clusters without the
//! webhook. Reads Kubernetes YAML or JSON and writes it back with the agent
//! added to every pod template, using the same library code as the webhook
//! (`shoal_injector::offline`).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use shoal_injector::annotations;
use shoal_injector::config::{parse_key_value, InjectFlags};
use shoal_injector::offline::{self, OfflineOptions};

/// Arguments of `shoal inject`.
#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// File to read (YAML or JSON; Pods, Deployments, StatefulSets, DaemonSets,
    /// Jobs, CronJobs, Lists, multi-document streams); a directory: its
    /// `.yaml`, `.yml` and `.json` files in name order (not its
    /// subdirectories), as `kubectl apply -f DIR` reads them; `-` reads
    /// standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub filename: PathBuf,
    /// Where to write the result (default: standard output).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Stands in for the namespace's annotations, `KEY=VALUE`, repeatable.
    /// Default: `shoal.io/inject=enabled` (pods may still opt out).
    #[arg(long = "namespace-annotation", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub namespace_annotation: Vec<(String, String)>,
    /// Namespace assumed for objects that name none.
    #[arg(short = 'n', long = "namespace", default_value = offline::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// The mesh trust bundle (PEM) handed to injected agents so they can
    /// verify the identity service and join the mesh; the webhook hands out
    /// its own. Without it, agents injected offline get no identity settings
    /// and run alone. Take it from the mesh CA Secret (install.md §7).
    #[arg(long, env = "SHOAL_TRUST_ANCHORS_FILE", value_name = "FILE")]
    pub trust_anchors_file: Option<PathBuf>,
    /// The identity service as injected agents reach it (`host:port`).
    #[arg(long = "identity-service", env = "SHOAL_IDENTITY_SERVICE",
          default_value = shoal_injector::config::DEFAULT_IDENTITY_ADDR, value_name = "HOST:PORT")]
    pub identity_service: String,
    /// What to inject (same flags and defaults as the webhook).
    #[command(flatten)]
    pub inject: InjectFlags,
}

/// Reads a trust bundle and checks that it holds CA certificates only.
fn read_trust_anchors(path: &std::path::Path) -> Result<String, String> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the trust anchors {}: {e}", path.display()))?;
    shoal_injector::meshca::check_trust_bundle(&pem)
        .map_err(|e| format!("{}: {e} (expected the mesh CA's ca.crt)", path.display()))?;
    Ok(pem)
}

/// Runs `shoal inject`.
pub fn run(args: InjectArgs) -> ExitCode {
    let input = if args.filename.as_os_str() == "-" {
        let mut s = String::new();
        match std::io::stdin().read_to_string(&mut s) {
            Ok(_) => s,
            Err(e) => return fail(&format!("cannot read standard input: {e}")),
        }
    } else if args.filename.is_dir() {
        match read_dir_manifests(&args.filename) {
            Ok(s) => s,
            Err(e) => return fail(&e),
        }
    } else {
        match std::fs::read_to_string(&args.filename) {
            Ok(s) => s,
            Err(e) => return fail(&format!("cannot read {}: {e}", args.filename.display())),
        }
    };
    let namespace_annotations: BTreeMap<String, String> = if args.namespace_annotation.is_empty() {
        BTreeMap::from([(
            annotations::INJECT.to_owned(),
            annotations::ENABLED.to_owned(),
        )])
    } else {
        args.namespace_annotation.into_iter().collect()
    };
    let mut config = args.inject.to_config();
    config.identity_addr = args.identity_service;
    if args.inject.pod_certificates && !config.identity {
        return bad_arguments(
            "--pod-certificates needs --identity=true (pod certificates are the agents' mesh identity)",
        );
    }
    match &args.trust_anchors_file {
        Some(_) if !config.identity => {
            return fail("--trust-anchors-file needs --identity=true (agents without identity settings do not join)")
        }
        Some(path) => match read_trust_anchors(path) {
            Ok(pem) => config.trust_anchors = Some(pem),
            Err(e) => return fail(&e),
        },
        None if config.pod_certificates => {
            return bad_arguments("--pod-certificates needs --trust-anchors-file: without the mesh bundle the agents would get a certificate volume but no identity service to find their peers by. Take it from the cluster: kubectl -n shoal-system get secret shoal-mesh-ca -o jsonpath='{.data.ca\\.crt}' | base64 -d > mesh-ca.crt (docs/install.md §7)")
        }
        None if config.identity => eprintln!(
            "shoal inject: warning: no --trust-anchors-file: injected agents get no \
             identity settings and run alone; pass the mesh CA bundle to let them join"
        ),
        None => {}
    }
    let options = OfflineOptions {
        config,
        namespace_annotations,
        default_namespace: args.namespace,
    };
    let (output, report) = match offline::inject_text(&input, &options) {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    for entry in &report {
        eprintln!("shoal inject: {}: {}", entry.object, entry.reason.as_str());
        for w in &entry.warnings {
            eprintln!("shoal inject: {}: warning: {w}", entry.object);
        }
    }
    let written = match &args.output {
        Some(path) => std::fs::write(path, output.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
        None => std::io::stdout()
            .lock()
            .write_all(output.as_bytes())
            .map_err(|e| format!("cannot write standard output: {e}")),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// The manifests of a directory as one multi-document stream.
fn read_dir_manifests(dir: &std::path::Path) -> Result<String, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
        })
        .collect();
    // A kustomization is for `kubectl apply -k`, not an object to apply.
    files.retain(|p| {
        let kustomization = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            matches!(
                n,
                "kustomization.yaml" | "kustomization.yml" | "Kustomization"
            )
        });
        if kustomization {
            eprintln!(
                "shoal inject: {}: skipped (a kustomization, not a manifest)",
                p.display()
            );
        }
        !kustomization
    });
    files.sort();
    if files.is_empty() {
        return Err(format!(
            "{} holds no .yaml, .yml or .json file",
            dir.display()
        ));
    }
    let mut stream = String::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        stream.push_str("---\n");
        stream.push_str(&text);
        if !text.ends_with('\n') {
            stream.push('\n');
        }
    }
    Ok(stream)
}

/// Exits 2, as for bad arguments (docs/configuration.md).
fn bad_arguments(message: &str) -> ExitCode {
    eprintln!("shoal inject: {message}");
    ExitCode::from(2)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("shoal inject: {message}");
    ExitCode::FAILURE
}
