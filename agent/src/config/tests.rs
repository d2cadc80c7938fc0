use super::Config;
use clap::Parser;

fn parse(flags: &[&str]) -> Result<Config, clap::Error> {
    Config::try_parse_from(std::iter::once("shoal-agent").chain(flags.iter().copied()))
}

#[test]
fn one_worker_thread_unless_asked_for_more() {
    let config = parse(&[]).expect("the defaults parse");
    assert_eq!(config.worker_threads, 1);
    let config = parse(&["--worker-threads", "4"]).expect("4 workers parse");
    assert_eq!(config.worker_threads, 4);
}

#[test]
fn worker_threads_outside_one_to_sixty_four_are_refused() {
    for bad in ["0", "65", "many"] {
        let flag = format!("--worker-threads={bad}");
        let e = parse(&[&flag]).expect_err(bad);
        assert!(
            e.to_string().contains("--worker-threads"),
            "{bad}: the error names the flag: {e}"
        );
    }
}
