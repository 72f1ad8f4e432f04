#!/bin/sh
# Port squatter for tests/root/nspawn_systemd_test.sh, run inside the container as an
# unprivileged user: tries, over and over, to bind and listen on every address given (the
# addresses credlock-firewall redirects IMDS traffic to, and credlock's admin port), each in
# every way a local user could: plain, with SO_REUSEADDR, with SO_REUSEPORT, and (IPv4) as the
# v4-mapped address on an IPv6 socket. A socket that succeeds is closed at once (the test only
# counts it; it must never stop credlock from coming back).
#
#   credlock-squatter DIR ADDR:PORT... (ADDR: 1.2.3.4 or [::1])
#
# Runs until DIR/stop exists (at most 60 s). Attempts made while DIR/window exists are counted
# separately: the test creates it right after killing credlock and creates DIR/stop once
# credlock is back, so they cover the whole time credlock was down. Prints "started" once, then
# at the end one line per address and way:
#   ADDR:PORT WAY attempts N window W bound B last-error ERR
# and "total attempts N window W bound B". Exit 0: nothing was ever bound; 1: something was.
# Only perl-base is needed (Debian minbase has no python).
exec perl -we '
use strict;
use Socket qw(AF_INET AF_INET6 SOCK_STREAM SOL_SOCKET SO_REUSEADDR SO_REUSEPORT IPPROTO_IPV6
              pack_sockaddr_in pack_sockaddr_in6 inet_pton);
use POSIX qw(strerror);
$| = 1;
my ($dir, @targets) = @ARGV;
die "usage: credlock-squatter DIR ADDR:PORT...\n" unless defined $dir && @targets;
my @ways;
for my $t (@targets) {
    my ($addr, $port);
    if ($t =~ /^\[([0-9a-fA-F:.]+)\]:(\d+)$/) {
        ($addr, $port) = ($1, $2);
        my $a6 = inet_pton(AF_INET6, $addr) or die "bad address $t\n";
        for my $w (qw(plain reuseaddr reuseport)) {
            push @ways, [$t, $w, AF_INET6, pack_sockaddr_in6($port, $a6)];
        }
    } elsif ($t =~ /^(\d+\.\d+\.\d+\.\d+):(\d+)$/) {
        ($addr, $port) = ($1, $2);
        my $a4 = inet_pton(AF_INET, $addr) or die "bad address $t\n";
        for my $w (qw(plain reuseaddr reuseport)) {
            push @ways, [$t, $w, AF_INET, pack_sockaddr_in($port, $a4)];
        }
        my $mapped = inet_pton(AF_INET6, "::ffff:$addr");
        push @ways, [$t, "v4mapped", AF_INET6, pack_sockaddr_in6($port, $mapped)];
    } else {
        die "bad target $t\n";
    }
}
my (%n, %win, %ok, %err);
my ($total, $total_win, $total_ok) = (0, 0, 0);
my $t0 = time;
print "started\n";
while (!-e "$dir/stop" && time - $t0 < 60) {
    my $in_window = -e "$dir/window" ? 1 : 0;
    for my $w (@ways) {
        my ($t, $way, $fam, $sa) = @$w;
        my $k = "$t $way";
        $n{$k}++; $total++;
        if ($in_window) { $win{$k}++; $total_win++; }
        my $s;
        if (!socket($s, $fam, SOCK_STREAM, 0)) { $err{$k} = "socket: $!"; next; }
        setsockopt($s, SOL_SOCKET, SO_REUSEADDR, 1) if $way eq "reuseaddr" || $way eq "reuseport";
        setsockopt($s, SOL_SOCKET, SO_REUSEPORT, 1) if $way eq "reuseport";
        if (bind($s, $sa) && listen($s, 16)) {
            $ok{$k}++; $total_ok++;
            $err{$k} = "BOUND";
            print "BOUND $k\n" if $ok{$k} == 1;
        } else {
            $err{$k} = ($!{EADDRINUSE} ? "EADDRINUSE" : "$!");
        }
        close($s);
    }
    select(undef, undef, undef, 0.01);
}
for my $w (@ways) {
    my $k = "$w->[0] $w->[1]";
    printf "%s attempts %d window %d bound %d last-error %s\n", $k, $n{$k} // 0, $win{$k} // 0,
        $ok{$k} // 0, ($err{$k} // "-") =~ s/ /_/gr;
}
print "total attempts $total window $total_win bound $total_ok\n";
exit($total_ok ? 1 : 0);
' -- "$@"
