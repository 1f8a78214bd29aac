//! `pier`: the deployment controller and operator CLI. Parses arguments and hands off to
//! `pier::controller`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "pier",
    version,
    about = "pier deployment controller: push revisions, deploy them to hosts, follow their status"
)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
