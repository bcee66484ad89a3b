/* python3 for the kdumpd initramfs, linked against libpython3.X.so.
 *
 * Debian's /usr/bin/python3.X carries its own statically linked copy of the interpreter
 * (6.8 MB), and nbdkit's python plugin needs libpython3.X.so (7.7 MB) anyway. This launcher
 * is the interpreter's own main() on top of the shared library, so the image carries the
 * interpreter once. module-setup.sh builds it when a C compiler and the Python headers are
 * there, and ships the static binary otherwise.
 */
#include <Python.h>

int main(int argc, char **argv)
{
    return Py_BytesMain(argc, argv);
}
