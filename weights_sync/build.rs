include!("../build_support/torch_link.rs");

fn main() {
    torch_link_args();
}
