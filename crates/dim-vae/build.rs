fn main() {
    dim_build::link_libtorch();
}
