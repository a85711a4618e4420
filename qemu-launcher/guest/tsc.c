/* The guest's TSC, printed in decimal: each tick of ./init carries it, so a
 * restore that sets the guest's TSC back (its clock then stands still until
 * the TSC passes its old value) shows in the guest's own output.
 * Built static by make-initrd.sh when a C compiler is there. */
#include <stdio.h>
#include <x86intrin.h>

int main(void)
{
	printf("%llu\n", (unsigned long long)__rdtsc());
	return 0;
}
